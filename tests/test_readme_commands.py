"""README.md's shell commands, pasted in order into a fresh copy of the project, work.

Every line of README's ```bash blocks is run as written (`bash -c`, in a temporary copy of the repository), with
one visible change: the flags in SHORTEN are appended to each command of the script they name, so the default
run takes a few steps on small batches instead of minutes (argparse takes the last value of a repeated flag).
Left out, each for the reason in SKIP: installing packages and building the extension (this environment already
has both), running the test suite itself, and the commands that need downloaded datasets or FaRL weights.
The prediction command reads `face.jpg`: the test writes one (a synthetic face) before it runs.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHORTEN = {
    "train.py": ["--max-steps", "2", "--batch-scale", "0.125", "--synthetic-length", "200", "--eval-samples", "20",
                 "--log-every", "1"],
    "evaluate.py": ["--n-test", "20"],
}
SKIP = {
    r"^pip install": "installs packages; this environment has them",
    r"^python setup\.py build_ext": "builds the C++ extension; the copy takes the one already built",
    r"^python -m pytest": "runs this test suite",
    r"--data-root DATA|--init farl|FaRL-": "needs downloaded datasets or FaRL weights (the loaders have their own tests)",
    r"checkpoint_rank0_iter": "needs the authors' released checkpoint (tests/test_predict_cli.py runs predict.py on "
                              "authors'-format checkpoints made from a small model)",
}


def readme_commands(path=os.path.join(ROOT, "README.md")) -> list:
    """Every command of the ```bash blocks, in order: lines without their trailing comments, split at `&&`."""
    text = open(path).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands += [part.strip() for part in line.split("&&")]
    return commands


def shortened(command: str) -> str:
    for script, flags in SHORTEN.items():
        if re.search(rf"(^|\s){re.escape(script)}(\s|$)", command):
            return command + " " + " ".join(flags)
    return command


def skip_reason(command: str):
    return next((why for pat, why in SKIP.items() if re.search(pat, command)), None)


def test_readme_has_the_commands_this_test_runs():
    cmds = readme_commands()
    assert any("train.py --stage 1" in c and not skip_reason(c) for c in cmds)
    assert any("train.py --stage 2" in c for c in cmds)
    assert any(c.startswith("python evaluate.py") and not skip_reason(c) for c in cmds)
    assert any(c.startswith("python predict.py") for c in cmds)
    assert any("--resume" in c for c in cmds)


def _write_face(path):
    from PIL import Image
    from data.synthetic import SyntheticFaces
    face = SyntheticFaces(split="test", size=128, length=1, seed=0, n_identities=10, task="landmarks")[0]["image"]
    Image.fromarray(face.permute(1, 2, 0).numpy()).save(path, format="JPEG")                # [3, H, W] uint8


def test_readme_commands_run_in_order(tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "out", "__pycache__", ".venv", "build", "*.pt"))
    _write_face(work / "face.jpg")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep +
               os.environ.get("PATH", ""))
    env.pop("RANK", None)
    ran = []
    for command in readme_commands():
        if skip_reason(command):
            continue
        cmd = shortened(command)
        proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"README command failed: {command}\n(run as: {cmd})\nstdout:\n" \
                                     f"{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 5, ran
    assert (work / "out" / "demo" / "eval.json").is_file()
    assert any(p.suffix == ".png" for p in (work / "out" / "predict").iterdir())
