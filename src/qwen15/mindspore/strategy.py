"""Per-rank checkpoints (rank_N/*.ckpt) merged into whole tensors with the strategy files that MindSpore saved.

What is used of a parameter's layout (`ParallelLayouts` in the strategy file): the device matrix and tensor map
(which dimension is split over which device axis; -1: not split), the optimizer-sharding size and step (ZeRO-style
`enable_parallel_optimizer`: the first dimension further split over ranks `step` apart) and, in a merged file or
one file per pipeline stage, the stage (ranks `stage * devices_per_stage` onwards hold it). A rank's piece is the
box of the full tensor given by its coordinates; the pieces are read by rows from their own files. Not supported
(and said so): uneven splits (param_split_shape), embedding fields (field > 0), nested tensor maps.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen15.errors import UserError
from qwen15.mindspore import protobuf as pb
from qwen15.mindspore.ckpt import CkptFile, CkptTensor
from qwen15.mindspore.source import RowSource, empty_rows


class StrategyError(UserError):
    """Strategy files or rank folders that cannot be merged; the message says what is missing."""


@dataclass
class Layout:
    dev_matrix: list[int]
    tensor_map: list[int]
    opt_size: int = 0
    opt_step: int = 0
    stage: int = 0
    split_shape: tuple[int, ...] = ()
    field: int = 0
    nested: bool = False

    @property
    def devices(self) -> int:
        return math.prod(self.dev_matrix)


def _ints(message: bytes | None) -> list[int]:
    return pb.repeated_ints(pb.parse_message(message).get(1, [])) if message else []


def _layout(data: bytes, stage: int) -> Layout:
    f = pb.parse_message(data)
    maps = f.get(2, [])
    return Layout(
        dev_matrix=_ints(f.get(1, [None])[0]),
        tensor_map=_ints(maps[0] if maps else None),
        opt_step=pb.signed(f.get(6, [0])[0]),
        opt_size=pb.signed(f.get(7, [0])[0]),
        stage=stage,
        split_shape=tuple(_ints(f.get(3, [None])[0])),
        field=pb.signed(f.get(5, [0])[0]),
        nested=sum(1 for m in maps if _ints(m)) > 1,
    )


def read_strategy_file(path: Path) -> dict[str, Layout]:
    """Parameter -> layout of one strategy file (protobuf ParallelStrategyMap, or its .json form)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StrategyError(f"{path}: not a strategy file ({e})") from None
        items = data.get("parallel_strategy_item") or {}
        stage = next(iter(items.values()), {}).get("stage", 0) if isinstance(items, dict) else 0
        out = {}
        for name, item in (data.get("parallel_layout_item") or {}).items():
            tmap = item.get("tensor_map", [])
            out[name] = Layout(
                dev_matrix=list(item.get("dev_matrix", [])),
                tensor_map=[-1 if isinstance(d, list) else d for d in tmap],
                opt_size=int(item.get("opt_weight_shard_size", 0)),
                opt_step=int(item.get("opt_weight_shard_step", 0)),
                stage=stage,
                split_shape=tuple(item.get("param_split_shape", [])),
                field=int(item.get("field", 0)),
                nested=any(isinstance(d, list) for d in tmap),
            )
        return _unprefix(out)
    try:
        f = pb.parse_message(path.read_bytes())
        items = [pb.parse_message(b) for b in f.get(2, [])]
        stage = 0
        if items and 2 in items[0]:
            stage = pb.parse_message(items[0][2][0]).get(1, [0])[0]
        out = {}
        for b in f.get(3, []):
            item = pb.parse_message(b)
            name = item[1][0].decode("utf-8")
            out[name] = _layout(item[2][0], stage)
    except (pb.WireError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise StrategyError(
            f"{path}: not a MindSpore strategy file ({e}); pass the ckpt_strategy*.ckpt files MindSpore saved "
            "(parallel.strategy_ckpt_save_file)"
        ) from None
    return _unprefix(out)


def _unprefix(layouts: dict[str, Layout]) -> dict[str, Layout]:
    """A merged file names parameters 'STAGE-name' (merge_pipeline_strategys): the stage moves into the layout."""
    out = {}
    for name, lay in layouts.items():
        m = re.fullmatch(r"(\d+)-(.+)", name)
        if m:
            lay.stage, name = int(m.group(1)), m.group(2)
        out[name] = lay
    return out


def read_strategy(path: Path) -> dict[str, Layout]:
    """A strategy file, or a folder of them (one per rank or per pipeline stage; identical ones collapse)."""
    if path.is_file():
        return read_strategy_file(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".ckpt", ".json")) if path.is_dir() else []
    if not files:
        raise StrategyError(f"{path}: no strategy files (*.ckpt or *.json) there")
    merged: dict[str, Layout] = {}
    for f in files:
        for name, lay in read_strategy_file(f).items():
            old = merged.setdefault(name, lay)
            if old != lay and old.stage == lay.stage:
                raise StrategyError(
                    f"{f}: parameter {name!r} has another layout than in the other strategy files"
                )
    return merged


def rank_box(lay: Layout, full: tuple[int, ...], local_rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, shape) of the piece of a tensor of shape `full` that `local_rank` (within its stage) holds."""
    coord, r = [0] * len(lay.dev_matrix), local_rank
    for i in range(len(lay.dev_matrix) - 1, -1, -1):
        coord[i], r = r % lay.dev_matrix[i], r // lay.dev_matrix[i]
    offsets, shape = [], []
    for dim, size in enumerate(full):
        m = lay.tensor_map[dim] if dim < len(lay.tensor_map) else -1
        if m == -1:
            offsets.append(0)
            shape.append(size)
        else:
            axis = len(lay.dev_matrix) - 1 - m
            part = size // lay.dev_matrix[axis]
            offsets.append(coord[axis] * part)
            shape.append(part)
    if lay.opt_size > 0 and full:
        part = shape[0] // lay.opt_size
        offsets[0] += ((local_rank // max(lay.opt_step, 1)) % lay.opt_size) * part
        shape[0] = part
    return tuple(offsets), tuple(shape)


def split_counts(lay: Layout, ndim: int) -> list[int]:
    counts = []
    for dim in range(ndim):
        m = lay.tensor_map[dim] if dim < len(lay.tensor_map) else -1
        counts.append(1 if m == -1 else lay.dev_matrix[len(lay.dev_matrix) - 1 - m])
    if lay.opt_size > 0 and ndim:
        counts[0] *= lay.opt_size
    return counts


@dataclass
class MergedTensor(RowSource):
    """A tensor assembled from the pieces that ranks hold: (offsets, the rank file's tensor) per distinct box."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    where: str
    pieces: list[tuple[tuple[int, ...], CkptTensor]]

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        if len(self.pieces) == 1:
            return self.pieces[0][1].read_rows(r0, r1)
        out = empty_rows(self.dtype, self.shape, r0, r1)
        for offsets, piece in self.pieces:
            lo, hi = max(r0, offsets[0]), min(r1, offsets[0] + piece.shape[0])
            if lo >= hi:
                continue
            block = piece.read_rows(lo - offsets[0], hi - offsets[0])
            index = (slice(lo - r0, hi - r0),) + tuple(
                slice(o, o + s) for o, s in zip(offsets[1:], piece.shape[1:])
            )
            out[index] = block
        return out


def rank_files(folder: Path) -> dict[int, Path]:
    """rank number -> its checkpoint file, for a folder of rank_N/ subfolders."""
    out = {}
    for sub in sorted(folder.glob("rank_*")):
        m = re.fullmatch(r"rank_(\d+)", sub.name)
        if not (m and sub.is_dir()):
            continue
        files = sorted(sub.glob("*.ckpt"))
        if not files:
            raise StrategyError(f"{sub}: no .ckpt file in this rank folder")
        if len(files) > 1:

            def step(p: Path) -> int:
                s = re.search(r"-(\d+)_\d+\.ckpt$", p.name)
                return int(s.group(1)) if s else -1

            steps = sorted(files, key=step)
            if step(steps[-1]) < 0 or step(steps[-1]) == step(steps[-2]):
                raise StrategyError(
                    f"{sub}: several checkpoints ({', '.join(p.name for p in files)}) and no single latest step "
                    "in their names; leave one per rank folder"
                )
            files = [steps[-1]]
        out[int(m.group(1))] = files[0]
    return out


def find_strategy(folder: Path) -> Path | None:
    """Where MindFormers puts the strategy files next to a checkpoint folder (output/strategy/), if there."""
    for candidate in (folder / "strategy", folder.parent / "strategy"):
        if candidate.is_dir() and any(p.suffix in (".ckpt", ".json") for p in candidate.iterdir()):
            return candidate
    return None


class ShardedCheckpoint:
    """The tensors of a set of rank_N/ folders, merged by their layouts (those `merge` declines, e.g. optimizer
    state that is never converted, and those without a layout are taken from the first rank holding them)."""

    def __init__(self, folder: Path, strategy: Path | None, merge=lambda name: True):
        self.folder, self.merge = folder, merge
        self.files = rank_files(folder)
        if strategy is None:
            strategy = find_strategy(folder)
        if strategy is None:
            raise StrategyError(
                f"{folder}: per-rank checkpoints ({len(self.files)} rank folders) but no strategy file was found in "
                f"{folder / 'strategy'} or {folder.parent / 'strategy'}; pass --strategy FILE_OR_FOLDER (the "
                "ckpt_strategy*.ckpt files the training saved)"
            )
        self.layouts = read_strategy(strategy)
        self.readers = {r: CkptFile(p) for r, p in sorted(self.files.items())}
        self.has_crc = any(f.has_crc for f in self.readers.values())
        self.strings = dict(self.readers[min(self.readers)].strings) if self.readers else {}
        self.tensors: dict[str, RowSource] = {}
        try:
            self._merge(strategy)
        except BaseException:
            self.close()
            raise

    def _merge(self, strategy: Path) -> None:
        names: dict[str, None] = {}
        for reader in self.readers.values():
            names.update(dict.fromkeys(reader.tensors))
        for name in names:
            lay = self.layouts.get(name)
            if lay is None or not lay.tensor_map or not self.merge(name):  # replicated, or not wanted merged
                owner = next(r for r in self.readers.values() if name in r.tensors)
                self.tensors[name] = owner.tensors[name]
                continue
            if lay.nested or lay.field > 0 or any(lay.split_shape):
                raise StrategyError(
                    f"{strategy}: parameter {name!r} has a layout qwen15 does not merge ("
                    + (
                        "a nested tensor map"
                        if lay.nested
                        else "an embedding field"
                        if lay.field
                        else "uneven splits"
                    )
                    + "); merge it with mindspore.transform_checkpoints(src, dst, prefix, strategy, None) first"
                )
            base = lay.stage * lay.devices
            ranks = list(range(base, base + lay.devices))
            missing = [r for r in ranks if r not in self.readers]
            if missing:
                raise StrategyError(
                    f"{self.folder}: parameter {name!r} is split over ranks {ranks[0]}..{ranks[-1]} (stage "
                    f"{lay.stage}, {lay.devices} devices per stage) but rank folder(s) "
                    f"{', '.join(f'rank_{r}' for r in missing)} are missing"
                )
            first = self.readers[ranks[0]].tensors.get(name)
            if first is None:
                raise StrategyError(
                    f"{self.files[ranks[0]]}: has no {name!r}, which the strategy places there"
                )
            counts = split_counts(lay, len(first.shape))
            full = tuple(s * c for s, c in zip(first.shape, counts))
            pieces: dict[tuple[int, ...], CkptTensor] = {}
            for r in ranks:
                offsets, shape = rank_box(lay, full, r - base)
                t = self.readers[r].tensors.get(name)
                if t is None or t.shape != shape or t.dtype != first.dtype:
                    found = "nothing" if t is None else f"{list(t.shape)} {t.dtype}"
                    raise StrategyError(
                        f"{self.files[r]}: tensor {name!r} should be the {list(shape)} {first.dtype} piece at "
                        f"{list(offsets)} of {list(full)} by the strategy, found {found}"
                    )
                pieces.setdefault(offsets, t)
            self.tensors[name] = MergedTensor(
                name, first.dtype, full, str(self.folder), sorted(pieces.items())
            )

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
