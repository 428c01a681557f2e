"""Monitors of a run: the online kNN monitor (weighted kNN accuracy of the frozen encoder at epoch
ends, rank 0) and SemPPL's pseudo-label monitor (every rank, every step).

The memory bank is ``data.knn_train`` (default: the training shards), the queries ``data.knn_val``;
at most ``data.knn_max_samples`` images of each, decoded once (``pipeline.labelled``) at the view
size and normalisation of the training recipe's first view, and kept for the whole run. It runs
after every ``run.knn_every``-th epoch.
"""

from __future__ import annotations

from typing import Any

import torch


class KNNMonitor:
    def __init__(
        self, cfg: Any, recipe: Any, options: dict[str, dict[str, Any]], device: torch.device
    ) -> None:
        view = recipe.views[0]
        self.size, self.mean, self.std = view.size, view.mean, view.std
        self.cfg, self.options, self.device = cfg, options, device
        self._data: tuple | None = None

    @classmethod
    def for_rank(
        cls, rank: int, cfg: Any, recipe: Any, options: dict, device: torch.device
    ) -> KNNMonitor | None:
        """The monitor on rank 0 when the config asks for one, else None."""
        if rank != 0 or not cfg.data.knn_val or not cfg.run.knn_every:
            return None
        return cls(cfg, recipe, options, device)

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """After the last step of every ``knn_every``-th epoch."""
        epochs, within = divmod(step, steps_per_epoch)
        return within == 0 and epochs % self.cfg.run.knn_every == 0

    def _load(self) -> tuple:
        from pipeline.labelled import load_labelled_images

        if self._data is None:
            d = self.cfg.data
            kw = {"size": self.size, "max_samples": d.knn_max_samples}
            bank = load_labelled_images(
                d.knn_train or d.train, storage_options=self.options["knn_train"], **kw
            )
            query = load_labelled_images(d.knn_val, storage_options=self.options["knn_val"], **kw)
            self._data = (*bank, *query)
        return self._data

    def accuracy(self, encoder: torch.nn.Module) -> float:
        from training.evaluate import extract_features, knn_classify

        bank_x, bank_y, query_x, query_y = self._load()
        kw = {"device": self.device, "batch_size": 256, "mean": self.mean, "std": self.std}
        bank_f, _ = extract_features(encoder, bank_x, **kw)
        query_f, _ = extract_features(encoder, query_x, **kw)
        return knn_classify(
            bank_f, bank_y, query_f, query_y, k=self.cfg.run.knn_k, temperature=self.cfg.run.knn_temperature
        )


class PseudoLabelMonitor:
    """How often SemPPL's pseudo-labels of this rank's unlabelled samples equal their true labels.

    The true labels come from ``data.true_labels`` (shards with the same keys), read once on each rank
    (label members only, ``pipeline.labelled.load_labels``) and never handed to the objective. After
    each step, :meth:`observe` compares the step's pseudo-labels (``state.pseudo_labels``: [B], -1
    where the objective had none) of the batch's unlabelled samples (label -1) with their true labels;
    :meth:`counts` gives the counters since the last report, which the reporter sums over ranks
    (``pseudo_label_accuracy`` = right / unlabelled samples seen)."""

    def __init__(self, labels: dict[str, int]) -> None:
        self.labels = labels
        self.right = self.seen = 0

    @classmethod
    def for_config(cls, cfg: Any, options: dict[str, Any]) -> PseudoLabelMonitor | None:
        if cfg.objective.name != "semppl" or not cfg.data.true_labels:
            return None
        from pipeline.labelled import load_labels

        return cls(load_labels(cfg.data.true_labels, storage_options=options))

    def observe(self, state: Any, batch: Any) -> None:
        pseudo = getattr(state, "pseudo_labels", None)
        if pseudo is None:
            return
        pseudo = pseudo.tolist()
        for key, label, guess in zip(batch.keys, batch.labels.tolist(), pseudo):
            if label < 0 and key in self.labels:
                self.seen += 1
                self.right += int(guess == self.labels[key])

    def counts(self) -> dict[str, int]:
        out = {"pseudo_right": self.right, "pseudo_seen": self.seen}
        self.right = self.seen = 0
        return out
