"""The code cites only files that exist, and only sections of docs/DESIGN.md that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["megatron_jp/**/*.py", "tools/*.py", "tools/*.sh", "bench/*", "csrc/**/*.*", "slurm/*", "tsubame/*",
           "examples/*.py", "examples/*.sh", "docs/*.md", "README.md"]  # tests name files they make
# a relative path with a folder and a source suffix, not inside <...> (system and library headers)
CITED_PATH = re.compile(r"(?<![\w./<-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|sh|sbatch|cu|cuh|cpp|h|yaml))\b")
CITED_SECTION = re.compile(r"(\S*)DESIGN\.md §(\d+)")
BASES = (ROOT, ROOT / "megatron_jp", ROOT / "csrc")


def source_files():
    for pattern in SOURCES:
        for path in ROOT.glob(pattern):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".so", ".pyc"):
                yield path


def is_ours(cited: str) -> bool:
    """A path whose first folder is one of the repository's (not torch's aten/, not CKPT_DIR/)."""
    first = cited.split("/")[0]
    return any((base / first).is_dir() for base in BASES)


def test_every_repository_path_the_code_cites_exists():
    missing = []
    for path in source_files():
        for cited in CITED_PATH.findall(path.read_text(encoding="utf-8", errors="ignore")):
            if is_ours(cited) and not any((base / cited).exists() for base in (*BASES, path.parent)):
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(missing)


def test_design_citations_name_docs_design_and_a_section_it_has():
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8"), re.M))
    wrong = []
    for path in source_files():
        for prefix, number in CITED_SECTION.findall(path.read_text(encoding="utf-8", errors="ignore")):
            if not prefix.endswith("docs/") or number not in sections:
                wrong.append(f"{path.relative_to(ROOT)}: {prefix}DESIGN.md §{number}")
    assert not wrong, "cite docs/DESIGN.md and one of its sections " + str(sorted(sections)) + ":\n" + "\n".join(wrong)


def test_the_path_check_tells_a_missing_file_from_an_existing_one():
    assert is_ours("megatron_jp/models/config.py") and (ROOT / "megatron_jp/models/config.py").exists()
    assert is_ours("training/checkpoint.py") and not (ROOT / "megatron_jp/training/checkpoint.py").exists()
    assert not is_ours("aten/src/ATen/native/cuda/ActivationGeluKernel.cu")
    assert CITED_PATH.findall("#include <torch/extension.h> see csrc/glu/glu.cu") == ["csrc/glu/glu.cu"]
