"""Task-quality metrics measured on data, each with a seeded bootstrap confidence interval.

What ``expect perplexity|accuracy|agreement|similarity|neighbours|metric|drift`` contracts read
(:mod:`surgery.contracts`). Both models -- the original and the surgered one -- run on the
same batches: the calibration batches, or held-out data the contract names with ``on "FILE"``
(at most :data:`HELD_OUT_SAMPLES` items of it, tokenised as ``calibrate with`` tokenises text:
:func:`surgery.inputs.calibration_inputs`). Each metric is a statistic over *items* (rows of
a batch); its interval is the percentile bootstrap over items (:data:`RESAMPLES` resamples,
95%, seeded), paired where a value compares two models (a ratio resamples the same items for
both).

* ``perplexity`` (decoders): ``exp`` of the mean next-token negative log-likelihood over the
  non-padded tokens of the data; ``1.10x`` is the surgered model's perplexity over the
  original's.
* ``accuracy`` (classifiers, ``[batch, classes]`` logits): the share of items whose top-1 class
  is the item's label -- a ``"label"`` field of each ``.jsonl`` line (a class index, or a name
  of ``config.label2id``), or a ``labels`` tensor of a tensor file. ``0.98x``: over the
  original's accuracy.
* ``agreement``: the share of predictions whose top-1 is unchanged (one per item for a
  classifier; one per non-padded token for a language model). Its complement is the flip rate.
  Needs no labels.
* ``similarity``: the mean cosine between each item's pooled embedding before and after --
  ``sentence_embedding`` if the model returns one, else ``last_hidden_state`` (or the first
  floating output) mean-pooled over the attention mask; a ``[batch, features]`` output is used
  as it is.
* ``neighbours``: for each item, the share of its ``k`` nearest items (cosine of the same
  pooled embeddings, itself excluded) that are still among its ``k`` nearest after surgery;
  ``k`` is :data:`~surgery.verbs.expect.DEFAULT_K` unless the contract says, at most the number
  of other items. The interval resamples these per-item overlaps (the neighbour sets
  themselves are those of the whole data).
* ``metric "module:function"``: ``function(model, batch) -> float`` on every batch
  (a :class:`Batch`: ``batch.call(model)`` runs the model, ``batch.labels`` holds labels when
  the data has them); the value is the mean over batches weighted by their size, on the
  surgered model (the original's is shown beside it, and ``0.98x`` divides by it). The user's
  module is imported only when the caller allows it (:func:`resolve_user_metric`).
* ``drift``: the relative output error of :mod:`surgery.metrics` (same masking, same value);
  its interval resamples items.

>>> import torch
>>> lo, hi = bootstrap_ratio(torch.ones(50), torch.full((50,), 2.0))
>>> lo == hi == 0.5
True
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery import ast
from surgery.inputs import InputError, Inputs, _lines, calibration_inputs
from surgery.metrics import float_outputs, padding_mask
from surgery.verbs.expect import DATA_METRICS, DEFAULT_K

__all__ = [
    "HELD_OUT_SAMPLES",
    "LEVEL",
    "RESAMPLES",
    "Batch",
    "Quality",
    "QualityError",
    "QualityReport",
    "UserMetric",
    "bootstrap",
    "bootstrap_mean",
    "bootstrap_ratio",
    "import_metric",
    "measure_quality",
    "resolve_user_metric",
]

#: Bootstrap resamples of every interval.
RESAMPLES = 1000
#: Confidence level of every interval.
LEVEL = 0.95
#: At most this many items of a held-out file named by ``on "FILE"`` are read.
HELD_OUT_SAMPLES = 256

UserMetric = Callable[[nn.Module, Any], float]
Progress = Callable[[str, int, int], None]


class QualityError(InputError):
    """A quality contract cannot be measured on this model or data; ``str(err)`` is a
    user-facing sentence and ``statement`` the contract it concerns (when known)."""

    def __init__(
        self, message: str, statement: ast.Expect | None = None, help: str | None = None
    ) -> None:
        super().__init__(message)
        self.statement = statement
        self.help = help


@dataclass
class Batch(Inputs):
    """One batch of model inputs, with the labels of its items when the data has them."""

    labels: Tensor | None = None


@dataclass
class Quality:
    """How one contract's metric measured: ``value`` is what the contract compares."""

    metric: str
    value: float
    interval: tuple[float, float] | None
    items: int  # resampled units: items (rows), or batches for a user metric
    data: str  # which data, in words
    detail: str  # the contract's detail line
    original: float | None = None  # the original model's own value, where it has one
    candidate: float | None = None  # the surgered model's value (differs from value: a ratio)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": self.value,
            "interval": list(self.interval) if self.interval else None,
            "items": self.items,
            "data": self.data,
            "original": self.original,
            "candidate": self.candidate,
        }


@dataclass
class QualityReport:
    """Every measured quality contract (by the statement's position), and the run's drift on
    the calibration data with its interval."""

    results: dict[int, Quality] = field(default_factory=dict)
    drift: float | None = None
    drift_interval: tuple[float, float] | None = None

    def get(self, stmt: ast.Expect) -> Quality | None:
        return self.results.get(stmt.span.start)


# --- the bootstrap -----------------------------------------------------------------------------


def bootstrap(
    statistic: Callable[[Tensor], Tensor],
    n: int,
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of ``n`` units.

    ``statistic(idx)`` gets a ``[R, n]`` tensor of resampled unit indices and returns the
    ``R`` statistics; resamples are drawn with a generator seeded by ``seed``, in chunks.
    """
    if n <= 0:
        raise ValueError("bootstrap of no units")
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))
    values: list[Tensor] = []
    done = 0
    # Small tensors: one thread is fastest, and a loaded machine's thread pool is far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        while done < resamples:
            r = min(chunk, resamples - done)
            idx = torch.randint(0, n, (r, n), generator=gen)
            values.append(statistic(idx).to(torch.float64))
            done += r
    finally:
        torch.set_num_threads(threads)
    stats = torch.sort(torch.cat(values)).values
    lo = stats[int((1 - level) / 2 * (resamples - 1))]
    hi = stats[math.ceil((1 + level) / 2 * (resamples - 1))]
    return float(lo), float(hi)


def bootstrap_mean(
    values: Tensor, *, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> tuple[float, float]:
    """Interval of the mean of ``values`` (one per unit).

    >>> lo, hi = bootstrap_mean(torch.tensor([0.0, 1.0] * 100))
    >>> 0.4 < lo < 0.5 < hi < 0.6
    True
    """
    v = values.to(torch.float64)
    return bootstrap(
        lambda idx: v[idx].mean(1), len(v), seed=seed, resamples=resamples, level=level
    )


def bootstrap_ratio(
    num: Tensor,
    den: Tensor,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Interval of ``transform(Σnum / Σden)`` over units (a ratio estimator, e.g. tokens per
    item differ); ``transform`` is applied to each resample (``exp`` for a perplexity)."""
    a, b = num.to(torch.float64), den.to(torch.float64)

    def stat(idx: Tensor) -> Tensor:
        ratio = a[idx].sum(1) / b[idx].sum(1).clamp_min(1e-300)
        return transform(ratio) if transform is not None else ratio

    return bootstrap(stat, len(a), seed=seed, resamples=resamples, level=level)


# --- what a model's output means ---------------------------------------------------------------


def _get(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None) if not isinstance(out, (tuple, list, Tensor)) else None


def _logits(out: Any) -> Tensor | None:
    """The prediction scores of an output: its ``logits``, or the output itself (a tensor, or
    the first of a tuple)."""
    found = _get(out, "logits")
    if isinstance(found, Tensor):
        return found
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _mask_for(batch: Inputs, t: Tensor) -> Tensor | None:
    mask = padding_mask(batch)
    if mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        return mask.to(torch.float64)
    return None


def _pooled(out: Any, batch: Inputs) -> Tensor | None:
    """``[B, H]`` embeddings of an output (see the module docstring), float64."""
    chosen = None
    for key in ("sentence_embedding", "last_hidden_state", "logits"):
        found = _get(out, key)
        if isinstance(found, Tensor) and found.is_floating_point():
            chosen = found
            break
    if chosen is None:
        floats = float_outputs(out)
        chosen = floats[0] if floats else None
    if chosen is None or chosen.dim() < 2:
        return None
    t = chosen.detach().to(torch.float64)
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        mask = _mask_for(batch, t)
        if mask is None:
            return t.mean(1)
        return (t * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    return t.flatten(1)


def _input_ids(batch: Inputs) -> Tensor | None:
    ids = batch.kwargs.get("input_ids")
    if ids is None and batch.args and isinstance(batch.args[0], Tensor):
        ids = batch.args[0]
    if isinstance(ids, Tensor) and not ids.is_floating_point() and ids.dim() == 2:
        return ids
    return None


def _describe_model(model: nn.Module) -> str:
    return f"`{type(model).__name__}`"


def _is_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return True  # a plain module: its output shape decides
    if getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    return (
        bool(can_generate())
        if callable(can_generate)
        else bool(getattr(config, "is_decoder", False))
    )


# --- per-item statistics of one batch ---------------------------------------------------------


def _token_nll(
    logits: Tensor, ids: Tensor, batch: Inputs, stmt: ast.Expect, model: nn.Module
) -> tuple[Tensor, Tensor]:
    """Per item: the summed next-token NLL and the number of tokens predicted."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise QualityError(
            f"`perplexity` needs next-token logits `[batch, tokens, vocabulary]`, but "
            f"{_describe_model(model)} gives `{list(logits.shape)}`",
            stmt,
            "use `expect agreement` or `expect similarity` for this model",
        )
    logp = torch.log_softmax(logits[:, :-1].to(torch.float32), dim=-1)
    target = ids[:, 1:].clamp(0, logits.shape[-1] - 1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).to(torch.float64)  # (B, T-1)
    mask = padding_mask(batch)
    if mask is not None and tuple(mask.shape) == tuple(ids.shape):
        m = (mask[:, 1:] * mask[:, :-1]).to(torch.float64)
    else:
        m = torch.ones_like(nll)
    return (nll * m).sum(1), m.sum(1)


def _top1_agreement(ref: Tensor, cand: Tensor, batch: Inputs) -> tuple[Tensor, Tensor]:
    """Per item: unchanged top-1 predictions, and predictions made."""
    same = (ref.argmax(-1) == cand.argmax(-1)).to(torch.float64)
    if same.dim() == 1:
        return same, torch.ones_like(same)
    same = same.flatten(2).mean(2) if same.dim() > 2 else same
    mask = _mask_for(batch, same)
    m = mask if mask is not None else torch.ones_like(same)
    return (same * m).sum(1), m.sum(1)


def _row_drift(ref: Any, cand: Any, batch: Inputs) -> tuple[Tensor, Tensor]:
    """Per row: ``Σ‖c − r‖²`` and ``Σ‖r‖²`` (masked as :func:`surgery.metrics.drift` masks);
    one unit for the whole batch when an output is not batch-major."""
    refs, cands = float_outputs(ref), float_outputs(cand)
    n = batch.batch_size()
    mask = padding_mask(batch)
    if not refs or any(t.dim() == 0 or t.shape[0] != n for t in refs):
        whole = sum(float((c.double() - r.double()).square().sum()) for c, r in zip(cands, refs))
        norm = sum(float(r.double().square().sum()) for r in refs)
        return torch.tensor([whole], dtype=torch.float64), torch.tensor([norm], dtype=torch.float64)
    num = torch.zeros(n, dtype=torch.float64)
    den = torch.zeros(n, dtype=torch.float64)
    for c, r in zip(cands, refs, strict=True):
        r64 = r.detach().to(torch.float64)
        diff = (c.detach().to(torch.float64) - r64).square()
        sq = r64.square()
        if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            w = mask.to(torch.float64).reshape(*mask.shape, *([1] * (diff.dim() - 2)))
            diff, sq = diff * w, sq * w
        num += diff.reshape(n, -1).sum(1)
        den += sq.reshape(n, -1).sum(1)
    return num, den


# --- data -------------------------------------------------------------------------------------


def _jsonl_labels(path: Path, count: int, model: nn.Module) -> Tensor | None:
    """The ``"label"`` of the first ``count`` texts of a ``.jsonl`` file (None: no line has
    one). Lines are read as :func:`surgery.inputs.calibration_inputs` reads them."""
    labels: list[Any] = []
    for no, line, _complete in _lines(path, 16 * 1024 * 1024):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            return None  # calibration_inputs has already explained the file's problems
        labels.append((no, obj.get("label") if isinstance(obj, dict) else None))
        if len(labels) >= count:
            break
    if all(v is None for _, v in labels):
        return None
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    out = []
    for no, v in labels:
        if isinstance(v, bool) or v is None:
            raise QualityError(f'`{path}` line {no} has no "label" (other lines have one)')
        if isinstance(v, int):
            out.append(v)
        elif isinstance(v, str) and v in label2id:
            out.append(int(label2id[v]))
        else:
            names = ", ".join(f"`{k}`" for k in sorted(label2id)) or "none"
            raise QualityError(
                f"`{path}` line {no}: label {json.dumps(v)} is not a class index or a label name "
                f"of the model (its names: {names})"
            )
    return torch.tensor(out, dtype=torch.long)


def _split_labels(batches: list[Inputs], labels: Tensor | None) -> list[Batch]:
    out: list[Batch] = []
    start = 0
    for b in batches:
        kwargs = dict(b.kwargs)
        own = None
        for key in ("labels", "label"):  # a tensor file's labels are not model inputs here
            if isinstance(kwargs.get(key), Tensor):
                own = kwargs.pop(key)
                break
        n = Inputs(b.args, kwargs).batch_size()
        if labels is not None:
            own = labels[start : start + n]
        start += n
        out.append(Batch(b.args, kwargs, labels=own))
    return out


@dataclass
class _Data:
    name: str  # in words, for details
    batches: list[Batch]
    is_calibration: bool


def _load_data(
    path: Path, shown: str, loaded: Any, model: nn.Module, batch: int, seed: int, stmt: ast.Expect
) -> _Data:
    if not path.is_file():
        raise QualityError(
            f'held-out data `{shown}` does not exist (named by `on "{shown}"`)',
            stmt,
            "paths are relative to the recipe's directory",
        )
    try:
        batches = calibration_inputs(path, loaded, samples=HELD_OUT_SAMPLES, batch=batch, seed=seed)
    except QualityError:
        raise
    except InputError as exc:
        raise QualityError(str(exc).replace("calibration", "held-out"), stmt) from exc
    labels = None
    if path.suffix.lower() == ".jsonl":
        count = sum(b.batch_size() for b in batches)
        labels = _jsonl_labels(path, count, model)
    items = sum(b.batch_size() for b in batches)
    return _Data(f"{items} items of `{shown}`", _split_labels(batches, labels), False)


# --- user metrics -------------------------------------------------------------------------------


def import_metric(spec: str) -> UserMetric:
    """The function ``module:function`` names (imported; nothing is called).

    Importing runs the module's code: call this only for a name the user gave explicitly
    (``--metric`` on the command line), as ``--arch`` is for factories.
    """
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise QualityError(f"`{spec}` is not of the form `module:function`")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise QualityError(
            f"cannot import module `{module_name}` of metric `{spec}`: {reason}",
            help="make sure the module is importable (installed or on PYTHONPATH)",
        ) from exc
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise QualityError(f"module `{module_name}` has no callable `{fn_name}` (metric `{spec}`)")
    return fn  # type: ignore[no-any-return]


def resolve_user_metric(
    stmt: ast.Expect, metrics: Mapping[str, UserMetric] | None, trust_code: bool
) -> UserMetric:
    """The function of ``expect metric "module:function"``: one the caller handed over in
    ``metrics`` (by its name), or, with ``trust_code``, imported. A recipe alone never makes
    surgery import code."""
    assert stmt.function is not None
    spec = stmt.function.value
    if metrics is not None and spec in metrics:
        return metrics[spec]
    if not trust_code:
        raise QualityError(
            f'`expect metric "{spec}"` would import and run `{spec.partition(":")[0]}`, '
            "which the recipe alone may not do",
            stmt,
            f'allow it with `--metric {spec}` (Python: `metrics={{"{spec}": function}}` or '
            "`trust_code=True`)",
        )
    try:
        return import_metric(spec)
    except QualityError as exc:
        raise QualityError(str(exc), stmt, exc.help) from exc


def _call_metric(
    fn: UserMetric, model: nn.Module, batch: Batch, stmt: ast.Expect, which: str
) -> float:
    assert stmt.function is not None
    spec = stmt.function.value
    try:
        with torch.no_grad():
            value = fn(model, batch)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise QualityError(
            f"metric `{spec}` failed on the {which} model: {type(exc).__name__}: {reason}", stmt
        ) from exc
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QualityError(
            f"metric `{spec}` returned `{value!r}` on the {which} model, not a finite number",
            stmt,
            "it must return a float: the metric of the model on that batch",
        )
    return float(value)


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Per-item statistics of both models on one data source (float64, concatenated)."""

    parts: dict[str, list[Tensor]] = field(default_factory=dict)

    def add(self, key: str, t: Tensor) -> None:
        self.parts.setdefault(key, []).append(t.detach().to(torch.float64).reshape(-1))

    def add2(self, key: str, t: Tensor) -> None:  # [B, H] rows
        self.parts.setdefault(key, []).append(t.detach().to(torch.float64))

    def __getitem__(self, key: str) -> Tensor:
        return torch.cat(self.parts[key])


def _collect(
    data: _Data,
    needs: set[str],
    stmts: dict[str, ast.Expect],
    original: nn.Module,
    model: nn.Module,
    outputs: tuple[Sequence[Any], Sequence[Any]] | None,
    progress: Progress | None,
) -> _Stats:
    stats = _Stats()
    total = len(data.batches)
    for i, batch in enumerate(data.batches):
        if outputs is not None:
            ref, cand = outputs[0][i], outputs[1][i]
        else:
            ref, cand = batch.call(original), batch.call(model)
        if "drift" in needs:
            num, den = _row_drift(ref, cand, batch)
            stats.add("drift_num", num)
            stats.add("drift_den", den)
        if needs & {"perplexity", "accuracy", "agreement"}:
            ref_logits, cand_logits = _logits(ref), _logits(cand)
            if ref_logits is None or cand_logits is None:
                stmt = next(stmts[m] for m in ("perplexity", "accuracy", "agreement") if m in stmts)
                raise QualityError(
                    f"`{stmt.metric.value}` compares predictions, but {_describe_model(model)} "
                    "outputs no logits",
                    stmt,
                    "for an embedding model use `expect similarity` or `expect neighbours`",
                )
            if "perplexity" in needs:
                stmt = stmts["perplexity"]
                ids = _input_ids(batch)
                if ids is None or not _is_decoder(model):
                    raise QualityError(
                        f"`perplexity` is defined for decoders (next-token language models); "
                        f"{_describe_model(model)} is not one"
                        if ids is not None
                        else "`perplexity` needs token ids (`input_ids`) as the model's input",
                        stmt,
                        "use `expect agreement` (unchanged top-1 predictions) instead",
                    )
                for key, logits in (("ref", ref_logits), ("cand", cand_logits)):
                    nll, tokens = _token_nll(logits, ids, batch, stmt, model)
                    stats.add(f"nll_{key}", nll)
                stats.add("tokens", tokens)
            if "agreement" in needs:
                same, made = _top1_agreement(ref_logits, cand_logits, batch)
                stats.add("agree", same)
                stats.add("predictions", made)
            if "accuracy" in needs:
                stmt = stmts["accuracy"]
                if batch.labels is None:
                    raise QualityError(
                        f"`accuracy` needs labels, and {data.name} has none",
                        stmt,
                        'name labelled data: `on "held-out.jsonl"` with a "label" field on each '
                        "line (or a `labels` tensor in a tensor file)",
                    )
                if ref_logits.dim() != 2:
                    raise QualityError(
                        "`accuracy` needs a classifier's `[batch, classes]` logits, but "
                        f"{_describe_model(model)} gives `{list(ref_logits.shape)}`",
                        stmt,
                        "use `expect agreement` for the share of unchanged predictions",
                    )
                labels = batch.labels.reshape(-1).to(torch.long)
                for key, logits in (("ref", ref_logits), ("cand", cand_logits)):
                    stats.add(f"correct_{key}", (logits.argmax(-1) == labels).to(torch.float64))
        if needs & {"similarity", "neighbours"}:
            e_ref, e_cand = _pooled(ref, batch), _pooled(cand, batch)
            if e_ref is None or e_cand is None:
                stmt = next(stmts[m] for m in ("similarity", "neighbours") if m in stmts)
                raise QualityError(
                    f"`{stmt.metric.value}` compares embeddings, but {_describe_model(model)} "
                    "outputs no floating tensor with a feature dimension",
                    stmt,
                )
            stats.add2("emb_ref", e_ref)
            stats.add2("emb_cand", e_cand)
        if progress is not None:
            progress("measuring quality", i + 1, total)
    return stats


def _interval_text(interval: tuple[float, float] | None, fmt: str) -> str:
    if interval is None:
        return ""
    return f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def _neighbour_overlap(ref: Tensor, cand: Tensor, k: int) -> Tensor:
    """Per item: the share of its ``k`` nearest items (cosine) kept after surgery."""
    n = ref.shape[0]

    def top(e: Tensor) -> Tensor:
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        chosen = torch.zeros(n, n, dtype=torch.bool)
        chosen.scatter_(1, sim.topk(k, dim=1).indices, True)
        return chosen

    return (top(ref) & top(cand)).sum(1).to(torch.float64) / k


def _measure(
    stmt: ast.Expect,
    data: _Data,
    stats: _Stats,
    seed: int,
    resamples: int,
    user: tuple[list[float], list[float], list[float]] | None,
) -> Quality:
    metric = stmt.metric.value
    ratio = stmt.value.unit == "x"
    where = (
        data.name
        if not data.is_calibration
        else (f'the calibration data ({data.name}; name held-out data with `on "FILE"`)')
    )
    boot: dict[str, Any] = {"seed": seed, "resamples": resamples}
    if metric == "drift":
        num, den = stats["drift_num"], stats["drift_den"]
        value = math.sqrt(float(num.sum()) / float(den.sum())) if float(den.sum()) > 0 else 0.0
        ci = bootstrap_ratio(num, den, transform=torch.sqrt, **boot)
        detail = f"{value:.4g}{_interval_text(ci, '.4g')} (relative output error) on {where}"
        return Quality(metric, value, ci, len(num), data.name, detail, candidate=value)
    if metric == "perplexity":
        a, b, t = stats["nll_cand"], stats["nll_ref"], stats["tokens"]
        if float(t.sum()) <= 0:
            raise QualityError("`perplexity` found no token to predict in the data", stmt)
        ppl = math.exp(float(a.sum() / t.sum()))
        ppl0 = math.exp(float(b.sum() / t.sum()))
        if ratio:
            ci = bootstrap(
                lambda idx: torch.exp((a[idx].sum(1) - b[idx].sum(1)) / t[idx].sum(1).clamp_min(1)),
                len(a),
                **boot,
            )
            value = ppl / ppl0
            detail = (
                f"{value:.4f}× the original's perplexity{_interval_text(ci, '.4f')} "
                f"({ppl:.4g} vs {ppl0:.4g}) on {where}"
            )
        else:
            ci = bootstrap_ratio(a, t, transform=torch.exp, **boot)
            value = ppl
            detail = (
                f"perplexity {ppl:.4g}{_interval_text(ci, '.4g')} (original {ppl0:.4g}) on {where}"
            )
        return Quality(metric, value, ci, len(a), data.name, detail, original=ppl0, candidate=ppl)
    if metric == "accuracy":
        c, c0 = stats["correct_cand"], stats["correct_ref"]
        acc, acc0 = float(c.mean()), float(c0.mean())
        if ratio:
            if acc0 <= 0:
                raise QualityError(
                    "the original model's accuracy on this data is 0: a ratio to it is undefined",
                    stmt,
                    "write an absolute accuracy, e.g. `>= 0.8`",
                )
            ci = bootstrap_ratio(c, c0, **boot)
            value = acc / acc0
            detail = (
                f"{value:.4f}× the original's accuracy{_interval_text(ci, '.4f')} "
                f"({acc:.4f} vs {acc0:.4f}) on {where}"
            )
        else:
            ci = bootstrap_mean(c, **boot)
            value = acc
            detail = (
                f"accuracy {acc:.4f}{_interval_text(ci, '.4f')} (original {acc0:.4f}) on {where}"
            )
        return Quality(metric, value, ci, len(c), data.name, detail, original=acc0, candidate=acc)
    if metric == "agreement":
        same, made = stats["agree"], stats["predictions"]
        value = float(same.sum() / made.sum().clamp_min(1))
        ci = bootstrap_ratio(same, made, **boot)
        detail = (
            f"{value:.4f}{_interval_text(ci, '.4f')} of top-1 predictions unchanged (flip rate "
            f"{1 - value:.2%}) on {where}"
        )
        return Quality(metric, value, ci, len(same), data.name, detail, candidate=value)
    if metric == "similarity":
        e, e0 = stats["emb_cand"], stats["emb_ref"]
        cos = torch.nn.functional.cosine_similarity(e, e0, dim=1, eps=1e-12)
        value = float(cos.mean())
        ci = bootstrap_mean(cos, **boot)
        detail = (
            f"mean cosine {value:.4f}{_interval_text(ci, '.4f')} of pooled embeddings on {where}"
        )
        return Quality(metric, value, ci, len(cos), data.name, detail, candidate=value)
    if metric == "neighbours":
        e, e0 = stats["emb_cand"], stats["emb_ref"]
        n = e.shape[0]
        if n < 2:
            raise QualityError("`neighbours` needs at least 2 items to find neighbours among", stmt)
        asked = stmt.k.value if stmt.k is not None else DEFAULT_K
        k = min(asked, n - 1)
        overlap = _neighbour_overlap(e0, e, k)
        value = float(overlap.mean())
        ci = bootstrap_mean(overlap, **boot)
        capped = f", capped from {asked} by the {n} items" if k < asked else ""
        detail = (
            f"{value:.4f}{_interval_text(ci, '.4f')} of each item's {k} nearest neighbours kept "
            f"(k = {k}{capped}) on {where}"
        )
        return Quality(metric, value, ci, n, data.name, detail, candidate=value)
    assert metric == "metric" and user is not None and stmt.function is not None
    vals, vals0, weights = (torch.tensor(x, dtype=torch.float64) for x in user)
    m = float((vals * weights).sum() / weights.sum())
    m0 = float((vals0 * weights).sum() / weights.sum())
    user_ci: tuple[float, float] | None = None
    if ratio:
        if m0 == 0:
            raise QualityError(
                f"metric `{stmt.function.value}` is 0 on the original model: a ratio to it is "
                "undefined",
                stmt,
                "write an absolute value instead of a ratio",
            )
        value = m / m0
        if len(vals) > 1:
            user_ci = bootstrap_ratio(vals * weights, vals0 * weights, **boot)
        detail = (
            f"{value:.4f}× the original's value{_interval_text(user_ci, '.4f')} ({m:.4g} vs {m0:.4g}) "
            f"over {len(vals)} batches of {where}"
        )
    else:
        value = m
        if len(vals) > 1:
            user_ci = bootstrap_ratio(vals * weights, weights, **boot)
        detail = (
            f"{stmt.function.value} = {m:.4g}{_interval_text(user_ci, '.4g')} (original {m0:.4g}) over "
            f"{len(vals)} batch{'es' if len(vals) != 1 else ''} of {where}"
        )
    return Quality(metric, value, user_ci, len(vals), data.name, detail, original=m0, candidate=m)


def measure_quality(
    contracts: Sequence[ast.Expect],
    original: nn.Module,
    model: nn.Module,
    *,
    calibration: Sequence[Inputs],
    loaded: Any = None,
    calibration_source: Path | None = None,
    calibration_outputs: tuple[Sequence[Any], Sequence[Any]] | None = None,
    recipe_dir: Path | None = None,
    metrics: Mapping[str, UserMetric] | None = None,
    trust_code: bool = False,
    seed: int = 0,
    resamples: int = RESAMPLES,
    progress: Progress | None = None,
) -> QualityReport:
    """Measure every contract of ``contracts`` that is measured on data, plus the drift of the
    calibration data with its interval.

    ``calibration`` are the run's calibration batches (the default data), read from
    ``calibration_source`` when the recipe names a file (a ``.jsonl`` there may carry labels);
    ``calibration_outputs`` are the ``(original, surgered)`` outputs on those batches when the
    caller has them already. ``loaded`` is what ``calibration_inputs`` tokenises held-out text
    with (a :class:`~surgery.load.LoadedModel`, or the model). ``on "FILE"`` is relative to
    ``recipe_dir``. User metrics come from ``metrics`` or, with ``trust_code``, are imported
    (:func:`resolve_user_metric`). Both models must be in ``eval()`` mode. Raises
    :class:`QualityError` (naming the contract) when a metric does not apply.
    """
    recipe_dir = recipe_dir or Path.cwd()
    report = QualityReport()
    wanted = [s for s in contracts if s.metric.value in DATA_METRICS]
    # One pass over each data source: the calibration data (None) first, then each file.
    sources: dict[str | None, list[ast.Expect]] = {None: []}
    for s in wanted:
        sources.setdefault(s.data.value if s.data is not None else None, []).append(s)
    calibration_items = sum(b.batch_size() for b in calibration)
    for source, stmts in sources.items():
        batch_size = max((b.batch_size() for b in calibration), default=8)
        outputs = None
        if source is None:
            labels = None
            if calibration_source is not None and calibration_source.suffix.lower() == ".jsonl":
                labels = _jsonl_labels(calibration_source, calibration_items, model)
            # A model with fixed example inputs repeats one batch: count each item once.
            first = list({id(b): i for i, b in reversed(list(enumerate(calibration)))}.values())
            first.sort()
            if len(first) < len(calibration):
                calibration = [calibration[i] for i in first]
                if calibration_outputs is not None:
                    calibration_outputs = (
                        [calibration_outputs[0][i] for i in first],
                        [calibration_outputs[1][i] for i in first],
                    )
                calibration_items = sum(b.batch_size() for b in calibration)
            batches = _split_labels(list(calibration), labels)
            data = _Data(f"{calibration_items} items", batches, True)
            outputs = calibration_outputs
        else:
            path = Path(source)
            path = path if path.is_absolute() else recipe_dir / path
            source_of = loaded if loaded is not None else original
            data = _load_data(path, source, source_of, model, batch_size, seed, stmts[0])
        needs = {s.metric.value for s in stmts} - {"metric"}
        if source is None:
            needs.add("drift")
        by_metric = {s.metric.value: s for s in stmts}
        stats = _collect(data, needs, by_metric, original, model, outputs, progress)
        if source is None and stats.parts.get("drift_num"):
            num, den = stats["drift_num"], stats["drift_den"]
            if float(den.sum()) > 0:
                report.drift = math.sqrt(float(num.sum() / den.sum()))
                report.drift_interval = bootstrap_ratio(
                    num, den, transform=torch.sqrt, seed=seed, resamples=resamples
                )
        for stmt in stmts:
            user = None
            if stmt.metric.value == "metric":
                fn = resolve_user_metric(stmt, metrics, trust_code)
                values = [_call_metric(fn, model, b, stmt, "surgered") for b in data.batches]
                values0 = [_call_metric(fn, original, b, stmt, "original") for b in data.batches]
                user = (values, values0, [float(b.batch_size()) for b in data.batches])
            report.results[stmt.span.start] = _measure(stmt, data, stats, seed, resamples, user)
    return report
