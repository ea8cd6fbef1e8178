"""The concept files can be copied out of the repository and run with nothing but torch and
numpy: rope.py alone, masks.py alone, model.py with those two, diffusion.py with those three.
Each is copied into an empty folder and its own command line (or demo) runs there, while every
other project module and every other installed requirement is made unimportable."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's other modules, and the requirements that are not torch or numpy.
FORBIDDEN = ["harness", "evaluations", "data", "train", "evaluate", "bench", "experiments",
             "tqdm", "tiktoken", "tiktoken_ext", "safetensors", "tokenizers", "matplotlib",
             "wonderwords", "jieba", "rapidfuzz"]
# Every import finder is wrapped so that the forbidden names are not found: to the copied file
# (and to torch, which probes for some of them) they look as if they were not installed.
BLOCK = f"""
import runpy, sys
class Hidden:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            return None
        return self.finder.find_spec(name, path, target)
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
sys.path.insert(0, ".")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

CASES = [  # (files copied, command line, what the output must say)
    (["rope.py"], ["rope.py", "--target-len", "131072"], "561.938"),  # diffusion-aware lambda
    (["masks.py"], ["masks.py", "--doc-lens", "3", "2"], "query-key pairs computed: 13 of 25"),
    (["rope.py", "masks.py", "model.py"], ["model.py", "--preset", "llada-8b"],
     "8,015,581,184"),
    (["rope.py", "masks.py", "model.py", "diffusion.py"], ["diffusion.py", "--steps", "20"],
     "-> answer"),
]


@pytest.mark.parametrize("copied, argv, says", CASES, ids=[c[1][0] for c in CASES])
def test_concept_file_runs_alone_in_an_empty_folder(tmp_path, copied, argv, says):
    for name in copied:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    out = subprocess.run([sys.executable, "-I", "-c", BLOCK, *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert says in out.stdout, out.stdout[-2000:]
    assert sorted(os.listdir(tmp_path)) == sorted(copied + ["__pycache__"] * any(
        p.name == "__pycache__" for p in tmp_path.iterdir()))  # it wrote nothing else


def test_the_block_really_blocks(tmp_path):
    """The harness above would let a forbidden import through if it were broken."""
    (tmp_path / "leaky.py").write_text("import tqdm\n")
    out = subprocess.run([sys.executable, "-I", "-c", BLOCK, "leaky.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "No module named 'tqdm'" in out.stderr
