"""View recipes as data, compiled to one NVIDIA DALI graph.

A :class:`ViewRecipe` lists one :class:`ViewSpec` per view. :func:`views_graph` turns it into DALI
operators: every image is decoded once, then each view applies, in BYOL's order (Grill et al. 2020,
arXiv 2006.07733, Appendix B / Table 6):

1. random resized crop to ``size`` x ``size`` (area fraction in ``scale``, aspect ratio in ``ratio``),
2. colour jitter with probability ``jitter_p`` (brightness, contrast, saturation, hue),
3. grayscale with probability ``grayscale_p``,
4. Gaussian blur with probability ``blur_p`` and sigma drawn uniformly from ``blur_sigma``,
5. solarize (``x -> 255 - x`` for ``x >= 128``) with probability ``solarize_p``,
6. horizontal flip with probability ``flip_p`` and normalisation ``(x/255 - mean) / std``, as CHW.

Random choices "with probability p" are per-sample Bernoulli draws (``fn.random.coin_flip``); one
operator call serves the whole batch, the same graph on CPU and GPU:

- jitter + grayscale are one ``fn.color_twist``: factors ``1 + coin * (u - 1)``; grayscale is
  saturation 0 (DALI's saturation projects onto the luma axis 0.299 R + 0.587 G + 0.114 B, the same
  weights as torchvision's ``rgb_to_grayscale``, and luma does not depend on hue or saturation, so
  "jitter then grayscale" equals one twist with the saturation factor multiplied by ``1 - gray``);
- blur is ``fn.gaussian_blur`` with per-sample sigma (window ``2 ceil(3 sigma) + 1``) inside a
  per-sample conditional (DALI conditionals, ``enable_conditionals=True``): samples that are not
  blurred skip the operator, which matters for view 2 of BYOL (p = 0.1; an identity blur cost half
  a real one);
- solarize is ``min(x, c - x)`` with a per-sample c of 255 (coin 1: ``255 - x`` above mid grey) or
  511 (coin 0: ``c - x > x`` everywhere, the identity);
- flip is ``crop_mirror_normalize``'s per-sample ``mirror``.

Pixel type: the crop is uint8 (as decoded; a masked crop is blended in float32 and rounded back);
from the colour twist on, the view is float32 on the 0..255 scale, clamped to [0, 255] right after
the twist (where torchvision's uint8 jitter clamps), so blur and solarize see exactly the values
torchvision's would, without rounding to integers between steps, and without the per-value rounding
that uint8 outputs of ``color_twist`` and ``gaussian_blur`` cost on the CPU (libm's scalar
``roundf``). On integer pixels solarize matches torchvision's ``x >= 128``
exactly; on float pixels its threshold is the midpoint 127.5 (BYOL's ``x < 0.5`` on [0, 1]).

Known differences from torchvision's ``ColorJitter`` (documented, tested within tolerance in
tests/pipeline/test_reference.py): DALI applies the four jitter factors in one fixed linear transform
(torchvision picks a random order and clamps after each step), and DALI's contrast pivots around mid
grey 128 where torchvision pivots around the image's mean grey.

Masked large views (ReLICv2, Tomasev et al. 2022, arXiv 2201.05119: large views of the
background-removed image). With ``ViewRecipe.mask_prob > 0`` the graph takes a second input, one
encoded saliency mask per image (``pipeline.shards.masks``: 8-bit grey PNG, 255 = keep, any size
with the image's aspect ratio), decoded on the CPU to weights ``m = mask / 255`` at its own size and
moved to the GPU in the GPU graph. Each large view draws its crop window first
(``fn.random_crop_generator`` on the image's size from ``fn.peek_image_shape``: the algorithm of
``random_resized_crop``) and resizes that window of the image to the view; then, with probability
``mask_prob`` (an independent per-sample coin per view, a DALI conditional), it takes the same window
of the mask in relative coordinates, resizes it to the view and blends ``fill + m (crop - fill)``.
This is the crop of the background-removed image ``fill + m (image - fill)`` up to the order of two
linear interpolations (identical where the mask is constant over a pixel's footprint; bounded on
soft edges, tests/pipeline/test_mask_views.py), and the crop and flip cut the mask with its image by
construction. Small views never use masks. With ``mask_prob == 0`` the graph is exactly the unmasked
one (no mask input, no extra operator, the same random streams).

Why crop first: blending the full image costs a full-image resize of the mask and a full-image blend
for every sample (~1 ms of the ~5.5 ms the relic recipe costs per 500 x 375 JPEG on one CPU thread,
``mask_cost`` 0.77 in benchmarks/views.py); after the crop only masked views pay, at the view's
size, for a mask resize from a 64-pixel-wide mask, one multiplication and the rounding back to uint8
(as the reference rounds its blend; both branches of the conditional must have one type):
``mask_cost`` 0.90 at ``mask_prob`` 0.5 and 0.98 at 0.1, measured side by side.

``device="gpu"`` uses the "mixed" decoder (nvJPEG) and the GPU variants of the same operators;
random parameters are always generated on the CPU (DALI argument inputs live on the CPU). The device
changes operator placement only: the graph is the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic.dataclasses import dataclass

#: The pydantic config of every config section, identical to ``training.config.SECTION_CONFIG``
#: (pipeline may not import training): unknown keys are errors, each field's docstring is its
#: description, and defaults are validated like given values.
SECTION_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

#: ImageNet channel statistics, the normalisation of BYOL/ReLIC (Grill et al. 2020, Appendix B).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError("expected a (min, max) pair with min <= max")
    return pair


#: A per-sample probability.
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
#: Random-resized-crop area fraction range: 0 <= min <= max <= 1 and max > 0.
CropScale = Annotated[
    tuple[NonNegativeFloat, Annotated[float, Field(gt=0.0, le=1.0)]], AfterValidator(_ordered)
]
#: A (min, max) range of positive values.
PositiveRange = Annotated[tuple[PositiveFloat, PositiveFloat], AfterValidator(_ordered)]
#: Colour-jitter strengths (brightness, contrast, saturation, hue), all >= 0, hue <= 0.5 turns.
JitterStrengths = tuple[
    NonNegativeFloat, NonNegativeFloat, NonNegativeFloat, Annotated[float, Field(ge=0.0, le=0.5)]
]
_Byte = Annotated[int, Field(ge=0, le=255)]
#: An 8-bit RGB colour, each channel 0..255.
Colour = tuple[_Byte, _Byte, _Byte]
ChannelMeans = tuple[float, float, float]
ChannelStds = tuple[PositiveFloat, PositiveFloat, PositiveFloat]


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ViewSpec:
    """One augmented view. Probabilities are per sample; defaults are BYOL's view 1 (Grill et al. 2020,
    arXiv 2006.07733, Table 6)."""

    size: PositiveInt = 224
    """Output height and width in pixels."""
    scale: CropScale = (0.08, 1.0)
    """Random-resized-crop area fraction range (Szegedy et al. 2015; torchvision's default)."""
    ratio: PositiveRange = (3 / 4, 4 / 3)
    """Random-resized-crop aspect-ratio (width / height) range."""
    flip_p: Probability = 0.5
    """Probability of a horizontal flip (BYOL: 0.5)."""
    jitter: JitterStrengths = (0.4, 0.4, 0.2, 0.1)
    """Colour-jitter strengths (brightness, contrast, saturation, hue) with torchvision's meaning:
    factors uniform in [1 - s, 1 + s] (clipped at 0); hue shift uniform in [-h, h] turns (BYOL:
    0.4, 0.4, 0.2, 0.1)."""
    jitter_p: Probability = 0.8
    """Probability of the colour jitter (BYOL: 0.8)."""
    grayscale_p: Probability = 0.2
    """Probability of converting to grayscale, after the jitter (BYOL: 0.2)."""
    blur_p: Probability = 1.0
    """Probability of the Gaussian blur (BYOL: 1.0 for view 1, 0.1 for view 2)."""
    blur_sigma: PositiveRange = (0.1, 2.0)
    """Range of the blur's sigma in pixels, drawn uniformly (BYOL: [0.1, 2.0])."""
    solarize_p: Probability = 0.0
    """Probability of solarizing (BYOL: 0.0 for view 1, 0.2 for view 2)."""
    mean: ChannelMeans = IMAGENET_MEAN
    """Per-channel mean of [0, 1] pixel values, subtracted before dividing by ``std``."""
    std: ChannelStds = IMAGENET_STD
    """Per-channel standard deviation of [0, 1] pixel values (> 0)."""


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ViewRecipe:
    """The views of one training sample; the first ``num_large`` are the large (target) views."""

    views: Annotated[list[ViewSpec], Field(min_length=1)]
    """Every view of a sample, the large views first."""
    num_large: PositiveInt = 2
    """Number of large views, at most the number of views."""
    mask_prob: Probability = 0.0
    """Probability that a large view is cut from the background-removed image (the sample's saliency
    applied to the crop window of the image; ReLICv2, Tomasev et al. 2022, arXiv 2201.05119), drawn per sample
    and per large view; small views never are. 0: masks are not read at all."""
    mask_fill: Colour = (0, 0, 0)
    """The background colour of masked images, 0..255 RGB: ``fill + m (image - fill)`` with
    ``m = mask / 255``. Black is our choice until the paper's fill is confirmed (a mean-grey fill,
    e.g. (124, 116, 104), would normalise to ~0 instead)."""

    @field_validator("num_large")
    @classmethod
    def _at_most_the_views(cls, num_large: int, info: ValidationInfo) -> int:
        views = info.data.get("views")
        if views is not None and num_large > len(views):
            raise ValueError(f"expected 1..{len(views)} (the number of views)")
        return num_large

    @property
    def sizes(self) -> list[int]:
        return [v.size for v in self.views]


PresetName = Literal["relic", "relicv2", "demo"]
PRESETS: tuple[str, ...] = get_args(PresetName)

_Value = TypeVar("_Value")


def _list_is_per_view(value: Any) -> str:
    return "per view" if isinstance(value, list) else "every view"


def _list_of_sequences_is_per_view(value: Any) -> str:
    per_view = isinstance(value, list) and all(isinstance(v, (list, tuple)) for v in value)
    return "per view" if per_view else "every view"


#: A preset option applied to every view (one value) or per view (a list with one value per view).
OneOrPerView = Annotated[
    Annotated[_Value, Tag("every view")] | Annotated[list[_Value], Tag("per view")],
    Discriminator(_list_is_per_view),
]
#: The same for options whose value is itself a sequence (``scale: [0.2, 1.0]`` is one pair for every
#: view; ``scale: [[0.2, 1.0], [0.05, 0.2]]`` one pair per view).
SequenceOrPerView = Annotated[
    Annotated[_Value, Tag("every view")] | Annotated[list[_Value], Tag("per view")],
    Discriminator(_list_of_sequences_is_per_view),
]


@dataclass(kw_only=True, config=SECTION_CONFIG)
class PresetOptions:
    """Overrides of a :func:`preset`; an option left at None keeps the preset's value.

    Every :class:`ViewSpec` field but ``size`` is an option too, applied to every view when given one
    value, or per view when given a list with one value per view (e.g. ``blur_p=[1.0, 0.5]``), after
    the group options (``size``/``large_scale`` for the large views, ``small_size``/``small_scale``
    for the small crops).
    """

    num_large: Annotated[int, Field(ge=2)] | None = None
    """Number L of large (target) views, >= 2 (default 2): the first L views, built by the preset's
    rule (BYOL's two views alternating, see :func:`preset`)."""
    num_small: NonNegativeInt | None = None
    """Number S of small crops after the large views: ``relicv2`` only (default 4); ``relic`` and
    ``demo`` are the two-large-view recipes and accept only 0."""
    size: PositiveInt | None = None
    """Side of the large views in pixels (relic, relicv2: 224; demo: 32)."""
    small_size: PositiveInt | None = None
    """Side of ``relicv2``'s small crops in pixels (default 96); the other presets ignore it."""
    large_scale: CropScale | None = None
    """Crop area range of the large views (relic: (0.08, 1); relicv2: (0.14, 1); demo: (0.4, 1));
    ``scale``, when given, overrides it."""
    small_scale: CropScale | None = None
    """Crop area range of ``relicv2``'s small crops (default (0.05, 0.14)); the other presets ignore it;
    ``scale``, when given, overrides it."""
    mask_prob: Probability | None = None
    """:attr:`ViewRecipe.mask_prob`: probability that a large view is cut from the background-removed
    image (default 0 for every preset: masks off)."""
    mask_fill: Colour | None = None
    """:attr:`ViewRecipe.mask_fill`: the background colour of masked images (default black)."""
    scale: SequenceOrPerView[CropScale] | None = None
    """:attr:`ViewSpec.scale`."""
    ratio: SequenceOrPerView[PositiveRange] | None = None
    """:attr:`ViewSpec.ratio`."""
    flip_p: OneOrPerView[Probability] | None = None
    """:attr:`ViewSpec.flip_p`."""
    jitter: SequenceOrPerView[JitterStrengths] | None = None
    """:attr:`ViewSpec.jitter`."""
    jitter_p: OneOrPerView[Probability] | None = None
    """:attr:`ViewSpec.jitter_p`."""
    grayscale_p: OneOrPerView[Probability] | None = None
    """:attr:`ViewSpec.grayscale_p`."""
    blur_p: OneOrPerView[Probability] | None = None
    """:attr:`ViewSpec.blur_p`."""
    blur_sigma: SequenceOrPerView[PositiveRange] | None = None
    """:attr:`ViewSpec.blur_sigma`."""
    solarize_p: OneOrPerView[Probability] | None = None
    """:attr:`ViewSpec.solarize_p`."""
    mean: SequenceOrPerView[ChannelMeans] | None = None
    """:attr:`ViewSpec.mean`."""
    std: SequenceOrPerView[ChannelStds] | None = None
    """:attr:`ViewSpec.std`."""

    @model_serializer(mode="wrap")
    def _given_options_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {name: value for name, value in handler(self).items() if value is not None}


class PresetError(ValueError):
    """Options that do not fit the chosen preset; ``option`` names the :class:`PresetOptions` field."""

    def __init__(self, message: str, *, option: str) -> None:
        super().__init__(message)
        self.option = option


#: The PresetOptions that set a ViewSpec field of each view.
_VIEW_OPTIONS = tuple(f.name for f in dataclasses.fields(ViewSpec) if f.name != "size")


def _byol_pair(size: int, scale: tuple[float, float] = (0.08, 1.0)) -> list[ViewSpec]:
    """BYOL's asymmetric pair (Grill et al. 2020, arXiv 2006.07733, Table 6): blur 1.0 / 0.1,
    solarize 0.0 / 0.2; both: flip 0.5, jitter p 0.8 with (0.4, 0.4, 0.2, 0.1), grayscale 0.2,
    blur sigma in [0.1, 2.0]."""
    return [
        ViewSpec(size=size, scale=scale, blur_p=1.0, solarize_p=0.0),
        ViewSpec(size=size, scale=scale, blur_p=0.1, solarize_p=0.2),
    ]


def large_views(num_large: int, size: int, scale: tuple[float, float]) -> list[ViewSpec]:
    """``num_large`` large views by our generalisation of BYOL's asymmetric pair: view ``i`` gets
    BYOL's view 1 settings (blur 1.0, solarize 0.0) for even ``i`` and view 2's (blur 0.1, solarize
    0.2) for odd ``i``; two views are exactly BYOL's pair."""
    pair = _byol_pair(size, scale)
    return [pair[i % 2] for i in range(num_large)]


#: Each preset's defaults: large-view side and crop scale, small-crop count, side and scale.
_PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "relic": {"size": 224, "large_scale": (0.08, 1.0), "num_small": 0},
    "relicv2": {
        "size": 224,
        "large_scale": (0.14, 1.0),
        "num_small": 4,
        "small_size": 96,
        "small_scale": (0.05, 0.14),
    },
    "demo": {"size": 32, "large_scale": (0.4, 1.0), "num_small": 0},
}


def _preset_views(name: str, options: PresetOptions, num_large: int) -> list[ViewSpec]:
    if name not in PRESETS:
        expected = ", ".join(repr(p) for p in PRESETS)
        raise ValueError(f"unknown view preset {name!r}: expected one of {expected}")
    defaults = _PRESET_DEFAULTS[name]

    def option(key: str) -> Any:
        value = getattr(options, key)
        return defaults[key] if value is None else value

    if name != "relicv2" and options.num_small:
        raise PresetError(
            f"preset {name!r}: num_small is a relicv2 option, got num_small={options.num_small}",
            option="num_small",
        )
    large = large_views(num_large, option("size"), option("large_scale"))
    if name == "demo":
        large = [dataclasses.replace(v, flip_p=0.0, blur_sigma=(0.1, 1.0)) for v in large]
    if name != "relicv2":
        return large
    small = ViewSpec(size=option("small_size"), scale=option("small_scale"), blur_p=0.5, solarize_p=0.0)
    return large + [small] * option("num_small")


def preset(name: str, options: PresetOptions | None = None, **overrides: Any) -> ViewRecipe:
    """A named recipe, changed by ``options`` or, equivalently, by keyword ``overrides`` (the fields of
    :class:`PresetOptions`: ``preset("relic", size=64)`` is ``preset("relic", PresetOptions(size=64))``).

    Every preset builds ``num_large`` = L >= 2 large views (default 2) of side ``size`` and crop area
    ``large_scale``, then S = ``num_small`` small crops (relicv2 only). Large views follow BYOL's
    asymmetric pair (Grill et al. 2020, arXiv 2006.07733, Table 6; view 1: blur 1.0, solarize 0.0;
    view 2: blur 0.1, solarize 0.2) *alternating*: large view ``i`` gets view 1's settings for even
    ``i`` and view 2's for odd ``i`` (:func:`large_views`). With L = 2 that is BYOL's pair; for L > 2
    the rule is our generalisation, not the papers'. ``mask_prob``/``mask_fill`` go to the recipe
    (every preset: masks off by default; ReLICv2's value is to be confirmed from the paper).

    - ``relic``: two 224 views with BYOL's asymmetric augmentation (ReLIC, Mitrovic et al. 2021,
      arXiv 2010.07922, uses BYOL's augmentations; Grill et al. 2020, Table 6).
    - ``relicv2``: ``relic``'s large views plus ``num_small`` (default 4, to be confirmed from the
      paper) 96x96 crops. ReLICv2 (Tomasev et al. 2022, arXiv 2201.05119) takes its multi-crop views
      from SwAV (Caron et al. 2020, arXiv 2006.09882, multi-crop: large crops area (0.14, 1), small
      crops (0.05, 0.14)); those are the default scales here (SwAV's values; ReLICv2's appendix could
      not be checked offline when this was written). Small crops get the symmetric part of the BYOL
      recipe with SwAV's blur p = 0.5 and no solarize. The number of small crops is a tunable.
    - ``demo``: two 32x32 views for the CPU demo on digits: crops keep at least 40% of the area, no
      flip (digits are not mirror symmetric), blur sigma scaled to the small image.

    Small crops are relicv2's alone (``num_small`` > 0 elsewhere is refused): ``relic`` and ``demo``
    are the two-view recipes, and relic with small crops is relicv2 with relic's large crop scale,
    ``preset("relicv2", large_scale=(0.08, 1.0))``.

    Option order: the group options (``size``, ``large_scale``; ``small_size``, ``small_scale``)
    build the views, then every per-view option (``scale``, ``blur_p``, ...) applies on top.

    Raises ``ValueError`` for an unknown preset, ``pydantic.ValidationError`` for a bad override
    (``num_large`` < 2 among them) and :class:`PresetError` for options that do not fit the preset
    (``num_small`` outside relicv2, a per-view list whose length is not the number of views).
    """
    if options is None:
        options = PresetOptions(**overrides)
    elif overrides:
        raise TypeError("preset: give options or keyword overrides, not both")
    num_large = 2 if options.num_large is None else options.num_large
    views = _preset_views(name, options, num_large)
    changes: list[dict[str, Any]] = [{} for _ in views]
    for option in _VIEW_OPTIONS:
        value = getattr(options, option)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value] * len(views)
        if len(values) != len(views):
            raise PresetError(
                f"preset {name!r}: option {option!r} lists {len(values)} values for {len(views)} views",
                option=option,
            )
        for change, v in zip(changes, values):
            change[option] = v
    masks: dict[str, Any] = {}
    if options.mask_prob is not None:
        masks["mask_prob"] = options.mask_prob
    if options.mask_fill is not None:
        masks["mask_fill"] = options.mask_fill
    return ViewRecipe(
        views=[dataclasses.replace(v, **change) for v, change in zip(views, changes)],
        num_large=num_large,
        **masks,
    )


# ---------------------------------------------------------------------------------------------------
# DALI graph


def _coin(p: float):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.random.coin_flip(probability=p, dtype=types.INT32)


def _factor(strength: float, coin):
    """``1 + coin * (u - 1)``, u ~ U[max(0, 1 - s), 1 + s]; 1 where the coin is 0."""
    import nvidia.dali.fn as fn

    u = fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
    return 1.0 + coin * (u - 1.0) if coin is not None else u


def _colour(images, spec: ViewSpec):
    """uint8 crop -> float32 in [0, 255] after jitter + grayscale (a cast when both are off)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    brightness, contrast, saturation, hue = spec.jitter
    kwargs: dict[str, Any] = {}
    if spec.jitter_p > 0 and any(spec.jitter):
        coin = None if spec.jitter_p >= 1 else _coin(spec.jitter_p)
        if brightness:
            kwargs["brightness"] = _factor(brightness, coin)
        if contrast:
            kwargs["contrast"] = _factor(contrast, coin)
        if saturation:
            kwargs["saturation"] = _factor(saturation, coin)
        if hue:
            # torchvision's hue factor is a fraction of the colour circle; DALI takes degrees.
            shift = fn.random.uniform(range=[-360.0 * hue, 360.0 * hue])
            kwargs["hue"] = shift * coin if coin is not None else shift
    if spec.grayscale_p > 0:
        keep = 1 - _coin(spec.grayscale_p) if spec.grayscale_p < 1 else 0.0
        kwargs["saturation"] = kwargs["saturation"] * keep if "saturation" in kwargs else keep * 1.0
    if not kwargs:
        return fn.cast(images, dtype=types.FLOAT)
    # Float output, then the clamp to [0, 255] that a uint8 output would apply (torchvision clamps
    # after each jitter step). Two binary min/max passes: DALI's CPU ternary ``math.clamp`` is generic
    # per-element code and costs more than both together; a uint8 output would round every value
    # through libm's roundf, the most expensive part of the twist.
    twisted = fn.color_twist(images, dtype=types.FLOAT, **kwargs)
    return dmath.min(dmath.max(twisted, 0.0), 255.0)


def _blur(images, spec: ViewSpec):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if spec.blur_p <= 0:
        return images
    sigma = fn.random.uniform(range=list(spec.blur_sigma))
    if spec.blur_p >= 1:
        return fn.gaussian_blur(images, sigma=sigma)
    # A per-sample branch (DALI conditionals split the batch): unblurred samples cost nothing.
    if fn.random.coin_flip(probability=spec.blur_p, dtype=types.BOOL):
        images = fn.gaussian_blur(images, sigma=sigma)
    return images


def _solarize(images, spec: ViewSpec):
    """``min(x, c - x)`` on float pixels in [0, 255]: c = 255 solarizes (``255 - x`` wherever
    ``x > 127.5``, which on integer pixels is torchvision's ``x >= 128``), c = 511 keeps ``x``
    (``c - x >= 256 > x``). Two arithmetic passes, per-sample c from the coin."""
    import nvidia.dali.math as dmath

    if spec.solarize_p <= 0:
        return images
    c = 255.0 if spec.solarize_p >= 1 else 511.0 - 256.0 * _coin(spec.solarize_p)
    return dmath.min(images, c - images)


def _crop(images, spec: ViewSpec):
    """The random resized crop of an unmasked view (uint8, as decoded)."""
    import nvidia.dali.fn as fn

    return fn.random_resized_crop(
        images,
        size=[spec.size, spec.size],
        random_area=list(spec.scale),
        random_aspect_ratio=list(spec.ratio),
    )


def _augment(x, spec: ViewSpec, dtype, layout: str):
    """Steps 2-6 on a crop: colour, blur, solarize, flip and normalisation."""
    import nvidia.dali.fn as fn

    x = _colour(x, spec)
    x = _blur(x, spec)
    x = _solarize(x, spec)
    mirror = _coin(spec.flip_p) if 0 < spec.flip_p < 1 else int(spec.flip_p >= 1)
    return fn.crop_mirror_normalize(
        x,
        mirror=mirror,
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        dtype=dtype,
        output_layout=layout,
    )


def _mask_weights(masks, device: str):
    """Per sample, the mask as float32 weights ``m = mask / 255``, ``[h, w, 1]`` at the mask's own
    size: decoded on the CPU (a few hundred bytes of PNG), moved to the GPU in the GPU graph."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    weights = fn.decoders.image(masks, device="cpu", output_type=types.GRAY) * (1.0 / 255.0)
    return weights.gpu() if device == "gpu" else weights


def _blend(crop, m, fill: tuple[int, int, int]):
    """``fill + m (crop - fill)``: one multiplication for a black fill, two more passes otherwise."""
    import numpy as np
    import nvidia.dali.types as types

    if not any(fill):
        return crop * m
    colour = float(fill[0]) if len(set(fill)) == 1 else types.Constant(np.asarray(fill, np.float32))
    return colour + (crop - colour) * m


def _masked_crop(decoded, shape, image_hw, weights, spec: ViewSpec, recipe: ViewRecipe):
    """A large view's crop, from the background-removed image with probability ``recipe.mask_prob``.

    The crop window is drawn first, by ``fn.random_crop_generator`` (the algorithm of
    ``random_resized_crop``: area and aspect ratio, 10 attempts, centre-crop fallback) on the image's
    size; the image's window is resized to the view (uint8). A masked view then takes the same
    window of the mask, in coordinates relative to the mask (so a mask of any size with its image's
    aspect ratio lines up), resized to the view, and blends: ``fill + m (crop - fill)``, rounded to
    uint8. That is the
    crop of the background-removed image up to the order of two linear interpolations (exactly where
    the mask is constant over a pixel's footprint), and it costs one view-sized resize of a small
    mask and one view-sized blend per masked view, not a full-image resize and blend per sample.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    anchor, extent = fn.random_crop_generator(
        shape, random_area=list(spec.scale), random_aspect_ratio=list(spec.ratio)
    )
    start = fn.cast(anchor, dtype=types.FLOAT)  # [y, x]
    end = start + fn.cast(extent, dtype=types.FLOAT)
    size = [spec.size, spec.size]
    crop = fn.resize(decoded, roi_start=start, roi_end=end, size=size)

    def masked(crop):
        m = fn.resize(
            weights, roi_start=start / image_hw, roi_end=end / image_hw, roi_relative=True, size=size
        )
        return fn.cast(_blend(crop, m, recipe.mask_fill), dtype=types.UINT8)

    if recipe.mask_prob >= 1:
        return masked(crop)
    if fn.random.coin_flip(probability=recipe.mask_prob, dtype=types.BOOL):
        crop = masked(crop)
    return crop


def views_graph(
    encoded,
    recipe: ViewRecipe,
    masks=None,
    *,
    device: str = "cpu",
    fp16: bool = False,
    layout: str = "CHW",
):
    """Inside a DALI pipeline definition: decode ``encoded`` (a DataNode of encoded images) once and
    return one DataNode per view (float32, or float16 with ``fp16``; ``layout`` CHW or HWC).

    ``masks``: a DataNode of encoded saliency masks (one per image, on the CPU), needed when
    ``recipe.mask_prob > 0`` and unused otherwise. ``device`` only places the operators ("mixed"
    decoder and "gpu" operators, or all "cpu"): the graph is the same."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device: expected 'cpu' or 'gpu', got {device!r}")
    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout: expected 'CHW' or 'HWC', got {layout!r}")
    decoded = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    dtype = types.FLOAT16 if fp16 else types.FLOAT
    crops = [None] * len(recipe.views)
    if recipe.mask_prob > 0:
        if masks is None:
            raise ValueError("views_graph: recipe.mask_prob > 0 needs masks= (a DataNode of encoded masks)")
        shape = fn.peek_image_shape(encoded, dtype=types.INT32)  # [H, W, C] as decoded, on the CPU
        image_hw = fn.cast(shape[0:2], dtype=types.FLOAT)
        weights = _mask_weights(masks, device)
        crops[: recipe.num_large] = [
            _masked_crop(decoded, shape, image_hw, weights, spec, recipe)
            for spec in recipe.views[: recipe.num_large]
        ]
    return [
        _augment(_crop(decoded, spec) if crop is None else crop, spec, dtype, layout)
        for crop, spec in zip(crops, recipe.views)
    ]


def build_pipeline(
    recipe: ViewRecipe,
    *,
    device: str = "cpu",
    batch_size: int,
    num_threads: int = 2,
    seed: int = 0,
    device_id: int | None = None,
    source: Callable | Any = None,
    inputs: Callable[[], tuple[Any, ...]] | None = None,
    prefetch_queue_depth: int = 2,
    fp16: bool = False,
    layout: str = "CHW",
):
    """A DALI pipeline whose outputs are the recipe's views followed by the labels.

    The encoded images and labels come either from ``source`` (a callable or iterator giving
    ``(list of uint8 arrays, int64 array [B])`` per batch, fed through ``fn.external_source``) or from
    ``inputs`` (a function called inside the pipeline definition returning ``(encoded, labels)``
    DataNodes, e.g. from ``fn.readers.webdataset``). When ``recipe.mask_prob > 0`` each batch carries a
    third item, the encoded masks (a list of uint8 arrays, one per image; ``pipeline.shards.masks``,
    ``FULL_MASK`` for an image without one): ``(images, labels, masks)`` from ``source``,
    ``(encoded, labels, masks)`` from ``inputs``. ``device="cpu"`` needs ``device_id=None``.

    On the CPU the outputs of ``pipe.run()`` are DALI's own buffers, reused by a later run: copy
    them before running the pipeline again (see the executor note below).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    if (source is None) == (inputs is None):
        raise ValueError("build_pipeline: give exactly one of source= (external source) or inputs=")
    if device == "gpu" and device_id is None:
        raise ValueError("build_pipeline: device='gpu' needs a device_id")
    with_masks = recipe.mask_prob > 0

    @pipeline_def(enable_conditionals=True)  # per-sample `if` on DataNodes (see _blur, _masked_crop)
    def graph():
        if source is not None:
            dtypes = [types.UINT8, types.INT64] + [types.UINT8] * with_masks
            fed = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes)
        else:
            fed = inputs()
        if len(fed) != 2 + with_masks:
            raise ValueError(
                f"build_pipeline: expected {'(images, labels, masks)' if with_masks else '(images, labels)'} "
                f"from the {'source' if source is not None else 'inputs'}, got {len(fed)} items"
            )
        encoded, labels, *masks = fed
        views = views_graph(
            encoded, recipe, masks[0] if masks else None, device=device, fp16=fp16, layout=layout
        )
        return (*views, labels)

    return graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        seed=seed & 0x7FFFFFFF,
        prefetch_queue_depth=prefetch_queue_depth,
        # CPU: DALI's classic executor, which keeps every operator's output buffers from one iteration
        # to the next (the dynamic one allocates them afresh, and on the CPU those megabytes come back
        # from the kernel as new pages every iteration). The price: a run's outputs are valid only
        # until the next run, so consumers copy them first (pipeline.loader.dali_to_torch does).
        # GPU: DALI's default; device buffers come from DALI's memory pool.
        exec_dynamic=None if device == "gpu" else False,
    )


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (seed, rank, epoch, ...): reproducible, distinct per tuple."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return (h ^ (h >> 31)) % (2**31 - 1) or 1


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "PresetError",
    "PresetName",
    "PresetOptions",
    "ViewRecipe",
    "ViewSpec",
    "build_pipeline",
    "derive_seed",
    "large_views",
    "preset",
    "views_graph",
]
