"""Image-generation metrics: FD/KID/precision-recall through torch-fidelity, CLIP score, R-precision and
nearest-neighbour memorisation.

* **Fréchet distance, KID, precision/recall** come from torch-fidelity. Offline there are no Inception
  weights, so :func:`fidelity_metrics` registers a torch-fidelity feature extractor over one of our CLIP
  image encoders: the numbers are "FD in <model> feature space", not FID, and are comparable only within
  that feature space. Given local Inception weights, :func:`inception_metrics` adds the standard FID and IS.
* **CLIP score** is torchmetrics' definition, ``100 * max(cos(image, text), 0)``, averaged.
* **CLIP R-precision** (AttnGAN / Park et al. 2021): an image scores a hit when its own prompt is more
  similar to it than each of ``n_distractors`` captions drawn from a pool of *other* captions.
* **Memorisation** is each image's cosine similarity to its nearest training image in CLIP space.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger("clipgen")

KID_SUBSETS = 100
MAX_KID_SUBSET = 1000  # torch-fidelity's default subset size, shrunk for small sets
MIN_IMAGES_PER_SET = 4  # FD needs a covariance; KID and precision/recall need neighbours


class UInt8Images(Dataset):
    """uint8 ``[N, H, W, 3]`` images as torch-fidelity wants them: uint8 ``[3, H, W]`` tensors."""

    def __init__(self, images: np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


# A torch-fidelity extractor is built by name from its registry, so the function it wraps is looked up here.
_EXTRACTORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_extractor(name: str, embed: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """Register (or rebind) torch-fidelity feature extractor ``name`` over ``embed``, which maps uint8 images
    ``[B, H, W, 3]`` to features ``[B, F]``; its one feature is called ``features``."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    class ImageFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        def forward(self, x: torch.Tensor):
            pixels = x.permute(0, 2, 3, 1).cpu()  # [B, H, W, 3] uint8
            return (_EXTRACTORS[self.name](pixels).float().cpu(),)

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

    _EXTRACTORS[name] = embed
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, ImageFeatures)
    return name


def register_clip_extractor(clip, name: str) -> str:
    """An extractor over ``clip``'s unit-norm image embedding (at the CLIP's own input size)."""
    return register_extractor(name, clip.encode_images)


def register_judge_extractor(judge, name: str) -> str:
    """An extractor over the shapes judge's penultimate features: a space that generation never optimises
    (the run's CLIP conditions and re-ranks the samples; the judge never touches them)."""
    return register_extractor(name, judge.features)


def fidelity_metrics(generated: np.ndarray, reference: np.ndarray, extractor: str, *, cuda: bool = False,
                     cache_root: Path | None = None, reference_cache_name: str | None = None,
                     **kwargs) -> dict[str, float]:
    """FD, KID (mean and std) and precision/recall of ``generated`` against ``reference`` images.

    With ``reference_cache_name`` the reference set's features and statistics are cached under
    ``cache_root`` (keyed by that name and the extractor), so each evaluation extracts them once.
    """
    import torch_fidelity

    if min(len(generated), len(reference)) < MIN_IMAGES_PER_SET:
        raise ValueError(f"FD/KID/PR need at least {MIN_IMAGES_PER_SET} images per set; got {len(generated)} and {len(reference)}")
    cached = reference_cache_name is not None
    if cached:
        screen_fidelity_cache(Path(cache_root), reference_cache_name)
    raw = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated), input2=UInt8Images(reference), fid=True, kid=True, prc=True,
        feature_extractor=extractor, cuda=cuda, verbose=False, batch_size=256, save_cpu_ram=True,
        kid_subset_size=min(MAX_KID_SUBSET, len(generated), len(reference)), kid_subsets=KID_SUBSETS,
        cache=cached, cache_root=str(cache_root) if cached else None, input2_cache_name=reference_cache_name,
        **kwargs)
    return {"fd": raw["frechet_inception_distance"], "kid": raw["kernel_inception_distance_mean"],
            "kid_std": raw["kernel_inception_distance_std"], "precision": raw["precision"], "recall": raw["recall"]}


# what torch-fidelity's caches hold besides tensors: numpy arrays (the FID statistics)
_ARRAY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType,
                  getattr(np, "_core", np.core).multiarray._reconstruct]


def screen_fidelity_cache(cache_root: Path, name: str) -> None:
    """torch-fidelity reloads its cache files with ``weights_only=False``, which runs any pickled code in them.
    So each file it may load for ``name`` is first loaded here with ``weights_only=True`` (tensors, float
    arrays, plain containers and nothing else); a file that fails is deleted, with a warning, and
    torch-fidelity recomputes it."""
    for path in sorted(Path(cache_root).glob(f"{name}-*.pt")):
        try:
            with torch.serialization.safe_globals(_ARRAY_GLOBALS):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure means the file is not plain data
            log.warning("%s is not plain tensor or array data (%s); deleting it, it will be recomputed",
                        path, str(error).splitlines()[0])
            path.unlink(missing_ok=True)


def check_inception_weights(path: str | Path) -> Path:
    """The local Inception weights file, checked to hold plain tensors only (torch-fidelity later loads
    it with ``weights_only=False``, which would run any pickled code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.inception_weights: no file at {path}. Download torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth on a machine with internet and copy it here, "
            "or remove eval.inception_weights to report CLIP-space FD only")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"eval.inception_weights: {path} is not a plain PyTorch state dict ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"eval.inception_weights: {path} does not hold a state dict of tensors")
    return path


def inception_metrics(generated: np.ndarray, reference: np.ndarray, weights: str | Path, *, cuda: bool = False,
                      cache_root: Path | None = None, reference_cache_name: str | None = None) -> dict[str, float]:
    """Standard FID and Inception Score from local Inception-v3 weights (torch-fidelity's 2015 port)."""
    import torch_fidelity

    state = torch.load(check_inception_weights(weights), map_location="cpu", weights_only=True)
    cached = reference_cache_name is not None
    if cached:
        screen_fidelity_cache(Path(cache_root), f"{reference_cache_name}-inception")
    # torch-fidelity unpickles its weights file (weights_only=False): hand it the tensors just checked, saved
    # by us into a private folder, never the user's file itself, which could change between check and use
    with tempfile.TemporaryDirectory(prefix="clipgen-inception-") as private:
        checked = Path(private) / "inception.pth"
        torch.save(state, checked)
        raw = torch_fidelity.calculate_metrics(
            input1=UInt8Images(generated), input2=UInt8Images(reference), fid=True, isc=True,
            feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(checked), cuda=cuda,
            verbose=False, batch_size=64, save_cpu_ram=True, isc_splits=min(10, len(generated)),
            cache=cached, cache_root=str(cache_root) if cached else None,
            input2_cache_name=f"{reference_cache_name}-inception" if cached else None)
    return {"fid": raw["frechet_inception_distance"], "is": raw["inception_score_mean"],
            "is_std": raw["inception_score_std"]}


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """torchmetrics' CLIP score: mean of ``100 * max(cos, 0)`` over matched (image, text) rows."""
    cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


class RPrecision(NamedTuple):
    value: float  # fraction of images whose own prompt beat every distractor
    distractors: int  # distractors per image (99 unless the pool was smaller)
    images: int


def r_precision(image_emb: torch.Tensor, true_text_emb: torch.Tensor, pool_emb: torch.Tensor,
                image_groups: list, pool_groups: list, n_distractors: int = 99, seed: int = 0) -> RPrecision:
    """CLIP R-precision of ``image_emb`` [N, D] against their own prompts ``true_text_emb`` [N, D].

    Each image's distractors are ``n_distractors`` pool captions [M, D] drawn at random among those whose
    group differs from the image's (a caption of the same attribute combination is not a wrong answer).
    A tie with a distractor counts as a miss.
    """
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    true_sim = (image_emb * torch.nn.functional.normalize(true_text_emb.float(), dim=-1)).sum(-1)
    pool_sim = image_emb @ torch.nn.functional.normalize(pool_emb.float(), dim=-1).T  # [N, M]
    group_ids = {g: i for i, g in enumerate(dict.fromkeys([*pool_groups, *image_groups]))}  # any hashable group
    pool_ids = np.array([group_ids[g] for g in pool_groups])
    rng = np.random.default_rng(seed)
    hits, fewest = 0, n_distractors
    for i, group in enumerate(image_groups):
        candidates = np.flatnonzero(pool_ids != group_ids[group])
        if len(candidates) == 0:
            raise ValueError(f"R-precision: no distractor caption differs from group {group!r}")
        chosen = rng.choice(candidates, size=min(n_distractors, len(candidates)), replace=False)
        fewest = min(fewest, len(chosen))
        hits += bool((true_sim[i] > pool_sim[i, chosen]).all())
    return RPrecision(hits / max(1, len(image_groups)), fewest, len(image_groups))


def similarity_summary(similarity: np.ndarray, threshold: float) -> dict[str, float]:
    """The distribution of nearest-neighbour cosine similarities, and the fraction above ``threshold``."""
    s = np.asarray(similarity, dtype=np.float64)
    if s.size == 0:
        return {"images": 0}
    q = np.quantile(s, [0.5, 0.9, 0.99])
    return {"images": int(s.size), "mean": float(s.mean()), "median": float(q[0]), "p90": float(q[1]),
            "p99": float(q[2]), "max": float(s.max()), "threshold": threshold,
            "fraction_above": float((s > threshold).mean())}
