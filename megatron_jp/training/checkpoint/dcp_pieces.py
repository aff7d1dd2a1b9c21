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
Two classes replace DCP's file writer and reader: StreamingWriter writes one piece at a time without
keeping copies and hashes each file on its way to disk; SafeReader unpickles .metadata with only
DCP's own classes allowed (torch's reader would run whatever a crafted pickle names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult

from megatron_jp.torch_compat import check_writer_hook, storage_info


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


# ----------------------------------------------------------------------------- writing, one piece at a time


class HashingStream(io.RawIOBase):
    """A write-only stream that forwards to `raw` and keeps the SHA-256 and length of what passed."""

    def __init__(self, raw):
        super().__init__()
        self.raw, self.sha, self.length = raw, hashlib.sha256(), 0
        self.hash_seconds = 0.0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        begin = time.perf_counter()
        self.sha.update(view)
        self.hash_seconds += time.perf_counter() - begin
        self.raw.write(view)
        self.length += len(view)
        return len(view)

    def tell(self) -> int:
        return self.length


@dataclasses.dataclass
class WriteReport:
    """What one rank's write produced: {file name: (bytes, sha256)} and the seconds spent hashing."""

    files: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    hash_seconds: float = 0.0


def _compact_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """The piece as a CPU tensor that owns exactly its bytes: torch.save writes a tensor's whole
    storage, and a piece is a view into a flat bucket. One piece at a time is copied, never the state."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
        tensor = tensor.contiguous().clone()
    return tensor


class StreamingWriter(FileSystemWriter):
    """DCP's file writer, minus its copies: DCP's own loop keeps every tensor it wrote referenced until
    the file is closed (a full copy of the state when pieces are views); this one writes each piece,
    hashes the bytes on their way to the file and lets the piece go. One file per rank, fsynced;
    the same file format (torch.save records at recorded offsets), so plain DCP readers read it."""

    def __init__(self, path):
        check_writer_hook(StreamingWriter)
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
        self.report = WriteReport()

    def write_data(self, plan: SavePlan, planner) -> torch.futures.Future:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with open(os.path.join(self.path, name), "wb") as raw:
            stream = HashingStream(raw)
            for item in plan.items:
                offset = stream.tell()
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    torch.save(_compact_cpu(data), stream)
                results.append(WriteResult(index=item.index, size_in_bytes=stream.tell() - offset,
                                           storage_data=storage_info(name, offset, stream.tell() - offset)))
                del data
            raw.flush()
            os.fsync(raw.fileno())
        self.report.files[name] = (stream.length, stream.sha.hexdigest())
        self.report.hash_seconds += stream.hash_seconds
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(results)
        return done


# ----------------------------------------------------------------------------- reading .metadata safely

# DCP's .metadata is a pickle. These are the only globals a checkpoint written by torch's DCP refers
# to (tensor dtypes are added below): anything else (os.system, builtins.eval, ...) is refused.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class MetadataRefused(pickle.UnpicklingError):
    """A .metadata pickle that names something a DCP checkpoint never holds."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise MetadataRefused(f"it refers to {module}.{name}, which no DCP checkpoint holds (a crafted or "
                              f"foreign file: a checkpoint folder is as trusted as a pickle)")


def read_metadata(folder) -> Metadata:
    """A folder's DCP .metadata, unpickled with only DCP's own classes allowed."""
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise MetadataRefused(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with the restricted .metadata unpickler (tensor records are already read
    with torch.load(weights_only=True) by DCP)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self.path)
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------- staging for async saves


class StagingBuffers:
    """Host copies of the pieces for an asynchronous save, allocated at the first save and reused by
    every later one (pinned when CUDA is there, so device-to-host copies run at full speed and need no
    pageable bounce buffer). A second copy of what is written is what an async save costs by nature;
    allocated once, it is a fixed, known amount instead of a new allocation per save."""

    def __init__(self):
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}

    def _buffer(self, key: str, index: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get((key, index))
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())
            self.buffers[(key, index)] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def stage(self, state: dict[str, list]) -> dict[str, list]:
        """Copy every piece into its buffer; returns the same pieces pointing at the buffers."""
        staged = {}
        for key, pieces in state.items():
            staged[key] = []
            for i, p in enumerate(pieces):
                buf = self._buffer(key, i, p.tensor)
                buf.copy_(p.tensor.detach(), non_blocking=buf.is_pinned())
                staged[key].append(dataclasses.replace(p, tensor=buf))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are complete before training changes the originals
        return staged


# ----------------------------------------------------------------------------- entry points


def save(state: dict[str, list], folder, group=None, no_dist: bool = False) -> WriteReport:
    """Write the pieces into `folder`; collective over `group` unless no_dist. Returns this rank's files
    with their sizes and SHA-256 (the writer computes them on the way to disk). Safe to call from a
    background thread if `group` is used by nothing else."""
    writer = StreamingWriter(folder)
    dcp.save(state, storage_writer=writer, planner=PieceSavePlanner(), process_group=group, no_dist=no_dist)
    return writer.report


def load(state: dict[str, list], folder, group=None, no_dist: bool = False):
    """Fill every piece in place from `folder`; every key must be in the checkpoint (see saved_shapes)."""
    dcp.load(state, storage_reader=SafeReader(folder), planner=PieceLoadPlanner(),
             process_group=group, no_dist=no_dist)


def saved_shapes(folder) -> dict[str, tuple[int, ...]]:
    """{key: global shape} of every tensor in a DCP folder (reads only its .metadata file, safely)."""
    metadata = read_metadata(folder)
    return {key: tuple(md.size) for key, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}
