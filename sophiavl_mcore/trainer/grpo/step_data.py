"""One step's :class:`~sophiavl_mcore.rollout.batch.StepBatch` at its three stations:
the requests and the engine batch an engine's answers make, the whole step's columns
every rank agrees on (for metrics), and a data-parallel share as model inputs.

Shapes: an engine answers ``G_e`` prompts × ``n`` samples = ``M_e`` responses; the step
has ``G = E·G_e`` prompts and ``N = G·n`` responses, group-major, engine-major.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.parallel.collectives import host_all_gather_object
from sophiavl_mcore.rollout.batch import StepBatch, is_counter
from sophiavl_mcore.rollout.exchange import gather_engines
from sophiavl_mcore.rollout.interface import RolloutRequest, RolloutResult
from sophiavl_mcore.rollout.layout import EngineLayout
from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch

if TYPE_CHECKING:
    from PIL import Image

    from sophiavl_mcore.data.config import PromptConfig
    from sophiavl_mcore.data.images import ImageBatch

logger = logging.getLogger(__name__)

#: The task's true thinking quality of a batch's replies, f64 [M] (NaN = unknown).
QualityOracle = Callable[[StepBatch], np.ndarray]


def build_requests(records: Sequence[Record], images: ImageBatch, tokenizer: Any,
                   prompt: PromptConfig, dropped: str) -> tuple[list[RolloutRequest], list[int],
                                                              list[Image.Image | None]]:
    """Engine requests for ``records`` (``images``: their decoded images, in order):
    (requests, the indices of the records they ask for, the PIL image per record or
    None). A record whose image could not be loaded is left out with a warning ending
    in ``dropped`` (what happens to it)."""
    from sophiavl_mcore.data.prompts import build_prompt

    pil: list[Image.Image | None] = [None] * len(records)
    requests, keep = [], []
    for i, r in enumerate(records):
        image = pil[i] = images.vllm_image(i)
        if r.image_path is not None and image is None:
            logger.warning("record %s: image %s skipped (%s); %s", r.problem_id, r.image_path,
                           images.skipped.get(i, "unknown"), dropped)
            continue
        keep.append(i)
        requests.append(RolloutRequest(prompt=build_prompt(r, tokenizer, prompt),
                                       images=[image] if image is not None else []))
    return requests, keep, pil


def engine_batch(first_group: int, records: list[Record], results: Sequence[RolloutResult | None],
                 images: list[Any], n: int, pad_id: int) -> StepBatch:
    """An engine's answers as a group-major batch. ``results[g]`` None: the prompt was
    dropped before generation — its ``n`` rows hold one pad token and are never trained."""
    empty = np.asarray([pad_id], np.int64)
    prompts, responses, logprobs, texts, lengths, truncated = [], [], [], [], [], []
    for res in results:
        prompts.append(res.prompt_token_ids if res is not None else empty)
        for j in range(n):
            s = res.samples[j] if res is not None else None
            responses.append(s.token_ids if s is not None else empty)
            logprobs.append(np.nan_to_num(s.logprobs) if s is not None else np.zeros(1, np.float32))
            texts.append(s.text if s is not None else "")
            lengths.append(len(s.token_ids) if s is not None else 0)
            truncated.append(float(s is not None and s.finish_reason == "length"))
    generated = np.asarray([r is not None for r in results], np.float64)
    return StepBatch.grouped(
        n, records, np.arange(first_group, first_group + len(records)),
        group_columns={"generated": generated},
        columns={"length": np.asarray(lengths, np.float64), "truncated": np.asarray(truncated)},
        images=images, prompt_ids=prompts, response_ids=responses, logprobs=logprobs, texts=texts)


def answer_code(text: str) -> float:
    """A stable number per well-formed answer (−1 when the format gate fails), so that
    answer diversity can be counted from gathered floats."""
    from sophiavl_mcore.rewards.outcome import parse_response

    p = parse_response(text)
    return float(zlib.crc32(p.answer.strip().encode())) if p.well_formed else -1.0


def gather_step(layout: EngineLayout, records: Sequence[Record], mine: StepBatch,
                oracle: QualityOracle | None = None) -> StepBatch:
    """Collective: the whole step's columns on every rank (engine leaders' copies), only
    generated responses and groups, without tokens. Adds the columns ``answer``
    (:func:`answer_code`), ``true_quality`` (``oracle``'s, NaN without one) and ``engine``
    (the engine that sampled each response); scalars: counters summed over engines, the
    rest averaged. ``records``: the step's, every engine's groups in order."""
    columns = dict(mine.columns, generated=mine.generated.astype(np.float64),
                   answer=np.asarray([answer_code(t) for t in mine.texts]),
                   true_quality=oracle(mine) if oracle is not None else np.full(len(mine), np.nan))
    names, gnames = sorted(columns), sorted(mine.group_columns)
    local = np.concatenate([np.stack([columns[c] for c in names], axis=1).reshape(-1),
                            np.stack([mine.group_columns[c] for c in gnames], axis=1).reshape(-1)])
    split = len(mine) * len(names)
    parts = gather_engines(layout, torch.from_numpy(local))
    resp = np.concatenate([p[:split].numpy().reshape(len(mine), -1) for p in parts])
    groups = np.concatenate([p[split:].numpy().reshape(mine.num_groups, -1) for p in parts])
    engine = np.repeat(np.arange(layout.num_engines, dtype=np.float64), len(mine))
    step = StepBatch.grouped(mine.n, list(records), np.arange(len(records)),
                             group_columns={c: groups[:, i] for i, c in enumerate(gnames)},
                             columns={**{c: resp[:, i] for i, c in enumerate(names)},
                                      "engine": engine},
                             scalars=merge_scalars(gather_scalars(layout, mine.scalars)))
    return step.select(np.flatnonzero(step.columns["generated"] > 0))


def gather_scalars(layout: EngineLayout, scalars: dict[str, float]) -> list[dict[str, float]]:
    """Collective: each engine's ``scalars`` (its leader's), one dict per engine."""
    out = host_all_gather_object(scalars)
    return [out[layout.leader(e)] for e in range(layout.num_engines)]


def merge_scalars(per_engine: Sequence[dict[str, float]]) -> dict[str, float]:
    """Counters (``*fail*``, ``*_requests``) add up over engines; the rest is averaged."""
    keys = sorted({k for m in per_engine for k in m})
    out = {}
    for k in keys:
        vals = [m[k] for m in per_engine if k in m]
        out[k] = float(np.sum(vals)) if is_counter(k) else float(np.mean(vals))
    return out


def to_rollout_batch(share: StepBatch, images: ImageBatch, vision_ids: torch.Tensor, pad_id: int,
                     biased_ids: Sequence[int] = ()) -> RolloutBatch:
    """A data-parallel share as model inputs. ``images``: the share's groups' images,
    group ``g`` of ``share`` at row ``g``."""
    prompt_ids, response_ids, masks, lps, pvs, grids = ([] for _ in range(6))
    generated = share.generated
    per_group = [_group_image(images, g) if share.group_columns["generated"][g] > 0 else (None, None)
                 for g in range(share.num_groups)]  # one tensor object per group's image
    for k, g in enumerate(share.group_of.tolist()):
        rid = torch.from_numpy(np.asarray(share.response_ids[k], np.int64))
        # A sampled vision token would read as an image slot without an image (M-RoPE /
        # vision merge): feed a pad there and leave it out of the loss.
        bad = torch.isin(rid, vision_ids)
        if rid.numel() == 0:  # an empty reply still needs one scored position
            rid, bad = torch.tensor([pad_id]), torch.tensor([True])
        prompt_ids.append(torch.from_numpy(np.asarray(share.prompt_ids[g], np.int64)))
        response_ids.append(torch.where(bad, pad_id, rid))
        masks.append(~bad if generated[k] else torch.zeros_like(bad))
        lp = np.asarray(share.logprobs[k], np.float32)
        lps.append(torch.from_numpy(lp if lp.size == rid.numel() else np.zeros(rid.numel(), np.float32)))
        pvs.append(per_group[g][0])
        grids.append(per_group[g][1])
    return RolloutBatch(prompt_ids, response_ids,
                        torch.tensor(share.columns["advantage"], dtype=torch.float32),
                        torch.from_numpy(share.group_id[share.group_of]),
                        [share.records[g].problem_type for g in share.group_of.tolist()],
                        response_mask=masks, rollout_logprobs=lps, pixel_values=pvs,
                        image_grid_thw=grids, pad_id=pad_id,
                        biased_ids=tuple(int(i) for i in biased_ids))


def _group_image(images: ImageBatch, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    row = images.image_index[i]
    if row is None:
        return None, None
    return (images.pixel_values[images.patch_slice(i)].clone(),
            images.image_grid_thw[row:row + 1].clone())
