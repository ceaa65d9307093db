"""The tools in docs/: evaluate.py scores a checkpoint as the scripts do."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_evaluate_scores_a_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "evaluate.py"), "tiny", "--eval-size", "4",
                          "--max-new-tokens", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"tiny: eval/reward 0\.000 \| eval/accuracy 0\.000 \| eval/format 0\.000 \| "
                        r"eval/lenient \d\.\d{3} \| \d+ s\n", out.stdout), out.stdout  # an untrained model
