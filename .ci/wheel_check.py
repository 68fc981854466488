"""`make wheel-check`: build critnet's wheel and use it as someone who ran `pip install critnet` would.

The wheel goes into a fresh virtual environment in a temporary folder outside the checkout, and everything runs
from other temporary folders, with no PYTHONPATH, so that nothing can come from the checkout:

1. the wheel holds the package, every preset and the two commands (``critnet``, ``critnet-train``);
2. ``pip install --no-deps`` puts it in the fresh environment and ``pip check`` finds its declared requirements
   satisfied;
3. ``critnet validate -c resnet20_cifar10`` (a preset by name) on the whole shared CIFAR-10 test split prints the
   public ResNet20's accuracies, 81.03 % top-1 and 98.72 % top-5, without Lightning's advertising tips;
4. the documentation's complete Python example (see :func:`python_example`) runs on every 1000th image, as its
   test runs it, and imports critnet from the fresh environment.

The fresh environment reaches the dependencies through a ``.pth`` file naming the development environment's
site-packages: installing them again (torch with its CUDA libraries is over 4 GB) would take minutes of CI's
time. Only path lines go in that file, so that the development environment's own ``.pth`` files (the editable
install of critnet among them) are not read and the checkout stays out of ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_ROOT = SHARED / "data" / "cifar10"
RESNET20_WEIGHTS = SHARED / "checkpoints" / "cifar10" / "resnet20-12fca82f.th"
COMMANDS = {"critnet": "critnet.cli:command", "critnet-train": "critnet.cli:train_command"}
# The public ResNet20 on the whole JPEG CIFAR-10 test split (10,000 images): 8103 and 9872 correct.
TOP1, TOP5 = "81.03", "98.72"
TIPS = ("litlogger", "litmodels")


class CheckFailed(Exception):
    pass


def step(message: str, started: float) -> None:
    print(f"wheel-check: {message} ({time.perf_counter() - started:.1f} s)", flush=True)


def start(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """The output of ``proc``, once it has ended with status 0."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise CheckFailed(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}:\n{out[-3000:]}{err[-3000:]}")
    return out + err


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    return finish(start(command, cwd, env))


def build_wheel(out: Path) -> Path:
    # setuptools builds in ./build/lib and packs whatever it finds there: a module deleted from the checkout since
    # the last build would still ship
    for stale in (REPO / "build").glob("lib*"):
        shutil.rmtree(stale)
    for stale in (REPO / "build").glob("bdist.*"):
        shutil.rmtree(stale)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)], REPO,
        dict(os.environ))
    wheels = list(out.glob("critnet-*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"pip wheel made {[w.name for w in wheels]}, not one critnet wheel")
    return wheels[0]


def check_contents(wheel: Path) -> int:
    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(p.name for p in (REPO / "critnet" / "presets").glob("*.yaml"))
    shipped = sorted(Path(n).name for n in names if re.fullmatch(r"critnet/presets/[^/]+\.yaml", n))
    if shipped != presets:
        raise CheckFailed(f"the wheel's presets {shipped} are not the checkout's {presets}")
    tops = {n.split("/")[0] for n in names} - {"critnet"}
    if len(tops) != 1 or not tops.pop().endswith(".dist-info"):
        raise CheckFailed(f"the wheel holds more than the critnet package and its metadata: {sorted(names)}")
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for name, target in COMMANDS.items():
        if f"{name} = {target}" not in text:
            raise CheckFailed(f"the wheel does not declare the command {name} = {target}:\n{text}")
    return len(names)


def fresh_venv(venv: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()
    dirs = dict.fromkeys([ours["purelib"], ours["platlib"]])  # pip itself comes from there too
    Path(site, "critnet-dev-dependencies.pth").write_text("".join(f"{d}\n" for d in dirs))
    return python


def clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_validate(venv: Path, cwd: Path) -> subprocess.Popen:
    return start([str(venv / "bin" / "critnet"), "validate", "-c", "resnet20_cifar10", "--data.root", str(CIFAR_ROOT),
                  "--model.weights", str(RESNET20_WEIGHTS)], cwd, clean_env(venv))


def check_validate(out: str, cwd: Path) -> None:
    row = re.search(r"│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*[\d.]+\s*│\s*10000\s*│", out)
    if row is None or (float(row[1]), float(row[2])) != (float(TOP1), float(TOP5)):
        raise CheckFailed(f"critnet validate did not print top-1 {TOP1} / top-5 {TOP5} on 10000 images:\n{out}")
    metrics = json.loads(next(cwd.glob("runs/resnet20_cifar10/lightning_logs/version_*/metrics.json")).read_text())
    if (metrics["top1"], metrics["top5"], metrics["samples"]) != (float(TOP1), float(TOP5), 10000):
        raise CheckFailed(f"metrics.json: {metrics}")
    tips = [tip for tip in TIPS if tip in out]
    if tips:
        raise CheckFailed(f"critnet validate printed Lightning's tips ({', '.join(tips)}):\n{out}")


def python_example() -> str:
    """The complete Python example of the documentation, as its test runs it: every 1000th image instead of every
    10th, the shared folder by its absolute path.

    It is the block tagged ``<!-- test: quickstart -->`` in README.md or docs/, else the first Python block under
    the README's "## From Python".
    """
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = [m[1] for page in pages if page.is_file()
              for m in re.finditer(r"<!-- test: quickstart -->\s*```python\n(.*?)```", page.read_text(), re.S)]
    if not blocks:
        readme = (REPO / "README.md").read_text()
        blocks = re.findall(r"```python\n(.*?)```", readme[readme.index("## From Python"):], re.S)[:1]
    if not blocks:
        raise CheckFailed("found no Python example in README.md or docs/: update .ci/wheel_check.py")
    code = blocks[0]
    for marker in ("step = 10  #", '"../shared/'):
        if marker not in code:
            raise CheckFailed(f"the Python example no longer holds {marker!r}: update .ci/wheel_check.py")
    return code.replace("step = 10  #", "step = 1000  #").replace('"../shared/', f'"{SHARED}/')


def check_python_example(venv: Path, cwd: Path) -> None:
    where = f"""import os, critnet
_wheel = os.path.realpath({str(venv)!r}) + os.sep
assert os.path.realpath(critnet.__file__).startswith(_wheel), f"critnet came from {{critnet.__file__}}, not the wheel"
print("critnet from", critnet.__file__)
"""
    (cwd / "example.py").write_text(where + python_example())
    # one thread: critnet validate decodes JPEGs on the other core meanwhile
    out = run([str(venv / "bin" / "python"), "example.py"], cwd, {**clean_env(venv), "OMP_NUM_THREADS": "1"})
    if "split-half Spearman:" not in out:
        raise CheckFailed(f"the Python example printed no split-half Spearman:\n{out[-3000:]}")
    for name in ("top_k.png", "channel_heatmap.png", "orders.png", "ranking.csv"):
        if not (cwd / name).is_file() or (cwd / name).stat().st_size == 0:
            raise CheckFailed(f"the Python example wrote no {name}")


def main() -> int:
    if not (RESNET20_WEIGHTS.is_file() and CIFAR_ROOT.is_dir()):
        print(f"wheel-check: {SHARED} is not beside the checkout", file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="critnet-wheel-check-") as tmp:
            tmp = Path(tmp)
            wheel = build_wheel(tmp / "dist")
            files = check_contents(wheel)
            step(f"built {wheel.name}: {files} files, the presets and the commands {', '.join(COMMANDS)}", started)
            python = fresh_venv(tmp / "venv")
            env = clean_env(tmp / "venv")
            run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--ignore-installed",
                 str(wheel)], tmp, env)
            check = run([str(python), "-m", "pip", "check"], tmp, env)
            step(f"installed into a fresh environment in {tmp}; pip check: {check.strip()}", started)
            # the two runs side by side: on CI's two cores this takes about the time of the longer one
            (tmp / "validate").mkdir()
            (tmp / "example").mkdir()
            validate = start_validate(tmp / "venv", tmp / "validate")
            try:
                check_python_example(tmp / "venv", tmp / "example")
            except BaseException:
                validate.kill()
                validate.wait()
                raise
            step("the documentation's Python example ran on the installed wheel", started)
            check_validate(finish(validate), tmp / "validate")
            step(f"critnet validate -c resnet20_cifar10: top-1 {TOP1} %, top-5 {TOP5} % on 10000 images", started)
    except CheckFailed as failed:
        print(f"wheel-check FAILED: {failed}", file=sys.stderr)
        return 1
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    step(f"passed, {cpu.ru_utime + cpu.ru_stime:.0f} s of CPU time", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
