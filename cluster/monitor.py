"""The online kNN monitor: weighted kNN accuracy of the frozen encoder at epoch ends (rank 0).

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
