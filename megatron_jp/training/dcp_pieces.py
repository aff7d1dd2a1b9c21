"""torch.distributed.checkpoint (DCP) for tensors given as pieces of full tensors.

A state dict here maps a checkpoint key to a list of pieces, each with `.tensor` (a view of local
memory), `.offsets` and `.global_shape` (sharding.ShardedPiece fits). DCP's own tensor types cannot
say this directly: a DTensor only describes regular grid shards, and one rank may hold several
blocks of one tensor at arbitrary offsets (the q, k and v rows of a fused qkv; the two halves of a
GLU fc1). So two small planners describe the blocks to DCP themselves:

- saving, every piece becomes one chunk of its key; DCP's global plan validation checks that the
  chunks of all ranks tile each full tensor without overlap (so pass only the primary pieces);
- loading, DCP's resharding computes, for every piece, the reads from whichever chunks were saved,
  so any layout loads a checkpoint of any other. Several pieces of a key may cover the same block
  (e.g. the model's and the optimizer's master copy of one parameter): each is filled.

The files are plain DCP: a reader that asks for whole tensors (dcp.load of full tensors) reads them.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.staging import AsyncStager


class PieceSavePlanner(DefaultSavePlanner):
    """One write item per piece; DCP's default global plan (metadata, validation) does the rest."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan([_write_item(key, p) for key, pieces in self.state_dict.items() for p in pieces])
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
        # the global plan rewrites index hints, so find the piece by its offsets (unique among primaries)
        for piece in self.state_dict[index.fqn]:
            if tuple(piece.offsets) == tuple(index.offset):
                return piece.tensor
        raise KeyError(f"no piece of {index.fqn} at offsets {tuple(index.offset)}")


def _write_item(key: str, piece) -> WriteItem:
    chunk = ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=piece.tensor.size())
    data = TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(piece.tensor),
                           size=torch.Size(piece.global_shape))
    return WriteItem(index=MetadataIndex(key, piece.offsets), type=WriteItemType.SHARD, tensor_data=data)


class PieceLoadPlanner(LoadPlanner):
    """Reads for every piece from the saved chunks it overlaps; each read lands in the piece's view."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False):
        self.state_dict, self.metadata = state_dict, metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, pieces in self.state_dict.items():
            chunks = [ChunkStorageMetadata(torch.Size(p.offsets), p.tensor.size()) for p in pieces]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value):
        raise ValueError(f"{read_item.dest_index.fqn}: pieces are tensors, the checkpoint holds bytes")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        # dest_index.index is the piece's position in its key's list (create_read_items_for_chunk_list)
        piece = self.state_dict[read_item.dest_index.fqn][read_item.dest_index.index]
        view = piece.tensor
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor: torch.Tensor):
        pass  # resolve_tensor returned a view of the piece: the reader has written in place


class _AlreadyStaged(AsyncStager):
    """dcp.async_save's staging step when stage_to_cpu() has already copied the pieces."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict


def stage_to_cpu(state: dict[str, list]) -> dict[str, list]:
    """Copies of the pieces in CPU memory: training may change the originals while a write runs."""
    return {key: [dataclasses.replace(p, tensor=p.tensor.detach().to("cpu", copy=True)) for p in pieces]
            for key, pieces in state.items()}


def save(state: dict[str, list], folder, group=None, no_dist: bool = False):
    """Write the pieces into `folder`; collective over `group` unless no_dist."""
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), planner=PieceSavePlanner(),
             process_group=group, no_dist=no_dist)


def async_save(state: dict[str, list], folder, group=None, no_dist: bool = False) -> Future:
    """Write already staged pieces (stage_to_cpu) from a background thread; the future completes with
    the write. The thread runs collectives on `group`: give it a group that nothing else uses."""
    return dcp.async_save(state, storage_writer=dcp.FileSystemWriter(folder), planner=PieceSavePlanner(),
                          process_group=group, no_dist=no_dist, async_stager=_AlreadyStaged())


def load(state: dict[str, list], folder, group=None, no_dist: bool = False):
    """Fill every piece in place from `folder`; every key must be in the checkpoint (see saved_shapes)."""
    dcp.load(state, storage_reader=dcp.FileSystemReader(folder), planner=PieceLoadPlanner(),
             process_group=group, no_dist=no_dist)


def saved_shapes(folder) -> dict[str, tuple[int, ...]]:
    """{key: global shape} of every tensor in a DCP folder (reads only its .metadata file)."""
    metadata = dcp.FileSystemReader(folder).read_metadata()
    return {key: tuple(md.size) for key, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}
