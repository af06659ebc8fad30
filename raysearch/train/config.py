"""The settings of a training run, as one frozen object (what `raysearch train` parses its options
into), with the per-objective defaults and every check made before anything starts."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from raysearch.models.names import DEFAULT_MODEL
from raysearch.train.views import DEFAULT_VIEW_EDITS, ViewConfig

OBJECTIVES: tuple[str, ...] = ("copy", "contrastive", "triplet", "supcon")
LABELLED_OBJECTIVES: tuple[str, ...] = ("contrastive", "triplet", "supcon")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
PROJECTION_INITS: tuple[str, ...] = ("random", "whitening")   # see raysearch.train.model.make_projection

# Per-objective defaults (None in TrainConfig means "this"). copy follows SSCD: InfoNCE at 0.05; a
# KoLeo weight of 10, the value SSCD's authors advise for new set-ups (their paper's 30 proved
# unstable outside their exact recipe); a few mixed views with weights from Beta(2, 2). supcon follows
# Khosla et al.'s 0.1; the margins suit unit vectors, whose distances lie in [0, 2].
DEFAULT_TEMPERATURE = {"copy": 0.05, "supcon": 0.1}
DEFAULT_MARGIN = {"contrastive": 0.7, "triplet": 0.2}
DEFAULT_KOLEO_WEIGHT = 10.0
DEFAULT_MIX_PROB = 0.05

# Settings that may differ when a run is resumed: they change how long or where it runs, not what
# it learns.
RESUMABLE_CHANGES: frozenset[str] = frozenset({"max_time", "workers", "use_gpu", "cpus_per_worker", "threads", "max_failures"})

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """'20m', '1h30m', '90s', '45' (seconds) -> seconds; None, '' or 'none' -> None."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("", "none", "0"):
        return None
    try:
        seconds = float(t)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * {"h": 3600.0, "m": 60.0, "s": 1.0}[m.group(2)]
            pos = m.end()
        if pos != len(t) or pos == 0:
            raise ValueError(f"--max-time must be a duration such as 20m, 1h30m or 90s, got {text!r}") from None
    if seconds <= 0:
        raise ValueError(f"--max-time must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of `raysearch train`; None means the objective's or the machine's default."""

    objective: str = "copy"
    labels: str | None = None              # CSV image_id,label (contrastive/triplet/supcon)
    init: str = DEFAULT_MODEL              # registry name or torchscript:PATH
    weights: str | None = None
    dim: int | None = None                 # linear projection to this size (None: the trunk's)
    projection_init: str = "random"        # 'random', or 'whitening' fitted on views (train.whitening)
    whiten_images: int = 2048              # images whose views the whitening is fitted on
    gem_p: float = 3.0
    train_blocks: str = "auto"             # 'all', 'auto' (all on GPU, 4 on CPU) or N final blocks
    input_size: int | None = None          # None: the init model's
    load_size: int | None = None           # shorter side images are decoded to (None: 2 x input)
    epochs: int = 10
    batch_size: int = 32                   # images per worker per step (each gives n_views views)
    n_views: int = 2
    lr: float = 3e-4
    weight_decay: float = 1e-6
    warmup_steps: int | None = None        # None: 5% of the steps
    temperature: float | None = None
    margin: float | None = None
    koleo_weight: float | None = None
    mixup_prob: float | None = None
    cutmix_prob: float | None = None
    mix_alpha: float = 2.0
    edits: tuple[str, ...] = DEFAULT_VIEW_EDITS
    edits_per_view: tuple[int, int] = (1, 3)
    crop_scale: tuple[float, float] = (0.25, 1.0)
    max_time: float | None = None          # seconds of training per invocation; then save and stop
    seed: int = 0
    workers: int = 1
    use_gpu: bool | None = None            # None: when the cluster has GPUs
    cpus_per_worker: float | None = None   # None: 1 (CPU training) or 4 (GPU training)
    threads: int | None = None             # torch threads per worker (None: see worker_threads)
    checkpoint_every: int = 0              # steps between checkpoints; 0: at the end of each epoch
    shuffle_buffer: int | None = None      # images in each worker's shuffle buffer (None: 4 batches)
    precision: str = "auto"                # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True
    # Worker-group failures Ray Train recovers from by restarting from the last checkpoint. One by
    # default: Ray 2.60's PlacementGroupCleaner can take a state-API miss on a busy machine for the
    # controller's death and remove the live placement group (ray-project/ray#65447 review); the
    # cleaner acts at most once per run, so one restart recovers from it.
    max_failures: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "supcon" and not self.labels:
            raise ValueError("--objective supcon needs --labels CSV (image_id,label)")
        if self.objective == "copy" and self.labels:
            raise ValueError("--objective copy learns from the images alone; --labels applies to contrastive, triplet and supcon")
        if self.epochs == 0 and self.projection_init != "whitening":
            raise ValueError("--epochs 0 leaves nothing to learn unless --init-projection whitening fits the projection")
        positive = {"batch_size": self.batch_size, "workers": self.workers, **({"epochs": self.epochs} if self.epochs else {})}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.batch_size < 2 and self.objective != "contrastive":
            raise ValueError(f"--batch-size must be >= 2 (negatives come from the batch), got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.margin is not None and self.margin <= 0:
            raise ValueError(f"--margin must be > 0, got {self.margin}")
        if self.koleo_weight is not None and self.koleo_weight < 0:
            raise ValueError(f"--koleo-weight must be >= 0, got {self.koleo_weight}")
        if self.objective != "copy":
            for name in ("mixup_prob", "cutmix_prob"):
                if getattr(self, name):
                    raise ValueError(f"--{name.replace('_prob', '')} applies to --objective copy only "
                                     f"(a mixed image has no single label), got {getattr(self, name)}")
            if self.koleo_weight:
                raise ValueError("--koleo-weight applies to --objective copy only")
        if self.objective in ("contrastive", "triplet") and self.temperature is not None:
            raise ValueError(f"--temperature does not apply to --objective {self.objective} (it uses --margin)")
        if self.objective in ("copy", "supcon") and self.margin is not None:
            raise ValueError(f"--margin does not apply to --objective {self.objective} (it uses --temperature)")
        if self.input_size is not None and not 32 <= self.input_size <= 4096:
            raise ValueError(f"--input-size must be between 32 and 4096, got {self.input_size}")
        if self.load_size is not None and self.input_size is not None and self.load_size < self.input_size:
            raise ValueError(f"--load-size must be >= --input-size, got {self.load_size} < {self.input_size}")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"--max-time must be positive, got {self.max_time}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.shuffle_buffer is not None and self.shuffle_buffer < 0:
            raise ValueError(f"--shuffle-buffer must be >= 0, got {self.shuffle_buffer}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")
        train_blocks = str(self.train_blocks).strip().lower()
        if train_blocks not in ("all", "auto") and not (train_blocks.isdigit() and int(train_blocks) >= 1):
            raise ValueError(f"--train-blocks must be 'all', 'auto' or a positive number, got {self.train_blocks!r}")
        if self.n_views < 2:
            raise ValueError(f"--views must be >= 2 (a view needs a positive), got {self.n_views}")
        if self.projection_init not in PROJECTION_INITS:
            raise ValueError(f"--init-projection must be one of {PROJECTION_INITS}, got {self.projection_init!r}")
        if self.whiten_images < 2:
            raise ValueError(f"--whiten-images must be >= 2, got {self.whiten_images}")

    # -- effective values ---------------------------------------------------------------------

    @property
    def effective_temperature(self) -> float | None:
        return self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE.get(self.objective)

    @property
    def effective_margin(self) -> float | None:
        return self.margin if self.margin is not None else DEFAULT_MARGIN.get(self.objective)

    @property
    def effective_koleo_weight(self) -> float:
        if self.objective != "copy":
            return 0.0
        return DEFAULT_KOLEO_WEIGHT if self.koleo_weight is None else self.koleo_weight

    def mix_probs(self) -> tuple[float, float]:
        """(mixup, cutmix) probabilities of a first view."""
        if self.objective != "copy":
            return 0.0, 0.0
        mixup = DEFAULT_MIX_PROB if self.mixup_prob is None else self.mixup_prob
        cutmix = DEFAULT_MIX_PROB if self.cutmix_prob is None else self.cutmix_prob
        return mixup, cutmix

    def effective_train_blocks(self, use_gpu: bool) -> str:
        """'auto' resolved: every block on a GPU, the last 4 on a CPU (where the whole network
        trains about 4x slower; see benchmarks/RESULTS.md)."""
        if str(self.train_blocks).lower() == "auto":
            return "all" if use_gpu else "4"
        return str(self.train_blocks).lower()

    def worker_threads(self, use_gpu: bool, node_cpus: int, workers_on_node: int) -> int | None:
        """Torch threads for one worker: --threads when given; on a GPU, torch's default (None);
        on CPUs, the node's cores shared by the workers on it. Ray reserves --cpus-per-worker (1)
        for scheduling, which leaves a core to the decode tasks, and would otherwise cap torch at
        that one thread: on 2 cores one worker then trained at about half the rate it reaches
        with both (benchmarks/RESULTS.md, "Training a copy descriptor")."""
        if self.threads is not None:
            return self.threads
        if use_gpu:
            return None
        return max(1, node_cpus // max(1, workers_on_node))

    def view_config(self, input_size: int) -> ViewConfig:
        mixup, cutmix = self.mix_probs()
        return ViewConfig(
            size=input_size, n_views=self.n_views, crop_scale=tuple(self.crop_scale),  # type: ignore[arg-type]
            edits=tuple(self.edits), edits_per_view=tuple(self.edits_per_view),  # type: ignore[arg-type]
            mixup_prob=mixup, cutmix_prob=cutmix, mix_alpha=self.mix_alpha,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"training settings have unknown fields {sorted(unknown)}")
        d = dict(d)
        for key in ("edits", "edits_per_view", "crop_scale"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def learning_settings(self) -> dict:
        """The settings that define what is learned (a resumed run must match them)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}
