"""A sentence-transformers folder from a checkpoint or a Hugging Face folder (for JMTEB and mteb).

The folder is built by sentence-transformers itself (a Transformer module over the model's AutoModel
and a Pooling module), written under a temporary name and renamed. It is then loaded back offline
and its embeddings are compared with megatron_jp.eval.embed's, which the sts and retrieval commands
use: the two agree to float32 rounding, so scores of the folder and of those commands agree.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from megatron_jp.eval.embed import embed_texts
from megatron_jp.files import output_dir
from megatron_jp.eval.models import quiet_transformers
from megatron_jp.eval.records import EvalInputError

CHECK_SENTENCES = ["吾輩は猫である。", "東京の天気は晴れです。ＡＢＣ１２３", "短い"]


def _st_modules():
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise EvalInputError("export-sentence-transformers needs `pip install sentence-transformers` "
                             "(or megatron_jp[eval])") from e
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules.transformer import Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    return SentenceTransformer, Transformer, Pooling


def _transformer(Transformer, folder: Path, max_seq_length: int, trust_remote_code: bool):
    """The Transformer module; its keyword names changed in sentence-transformers 6."""
    params = inspect.signature(Transformer.__init__).parameters
    remote = {"trust_remote_code": trust_remote_code}
    if "model_kwargs" in params:
        return Transformer(str(folder), max_seq_length=max_seq_length, model_kwargs=remote, config_kwargs=remote,
                           processor_kwargs=remote)
    return Transformer(str(folder), max_seq_length=max_seq_length, model_args=remote, config_args=remote,
                       tokenizer_args=remote)


def export_sentence_transformers(loaded, output: str | Path, pooling: str, max_seq_length: int) -> dict:
    """Build the folder beside `output`, then swap it in (an earlier folder is replaced whole, never
    mixed with the new files; tools/evaluate.py asked for --overwrite before)."""
    output = Path(output)
    if loaded.encoder is not None and not loaded.native:
        raise EvalInputError(f"{loaded.source}: no transformers class fits this architecture; export it with "
                             f"tools/convert_to_hf.py and pass that folder with --trust-remote-code")
    SentenceTransformer, Transformer, Pooling = _st_modules()
    with output_dir(output) as tmp:
        with quiet_transformers():  # BertModel's pooler is new (and unused by the pooling module)
            transformer = _transformer(Transformer, loaded.hf_folder(), max_seq_length, loaded.trust_remote_code)
            pooling_module = Pooling(loaded.hidden_size, pooling_mode=pooling)
            SentenceTransformer(modules=[transformer, pooling_module], device="cpu").save(str(tmp))
    return {"output": str(output), "pooling": pooling, "max_seq_length": max_seq_length,
            "max_difference": check_export(loaded, output, pooling, max_seq_length)}


def check_export(loaded, folder: Path, pooling: str, max_seq_length: int) -> float:
    """Largest |difference| between the folder's embeddings and ours on a few sentences."""
    SentenceTransformer, _, _ = _st_modules()
    with quiet_transformers():
        st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=loaded.trust_remote_code)
    theirs = torch.as_tensor(st.encode(CHECK_SENTENCES, convert_to_numpy=True))
    ours = embed_texts(loaded.backbone().cpu(), loaded.tokenizer, CHECK_SENTENCES, "cpu", pooling, max_seq_length)
    return (theirs - ours).abs().max().item()
