"""Bad values are caught before anything loads (one table, cinecli.effects.rules), and the CLI conventions people expect.

Everything here runs in-process through CliRunner with the loaders replaced by functions that fail loudly, so a
value that slips past the checks shows up as an AssertionError, not as a slow run.
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from cinecli import __version__
from cinecli.cli.app import app
from cinecli.core.errors import UsageError
from cinecli.effects.rules import parse_shard
from cinecli.generate.selftest import sample_image

# A preset with an inline backbone whose weights do not exist: resolving it reads only the TOML, so any field
# check that runs later than resolution would hit the loud loaders below.
PRESET = """name = "probe"
prompt = "the camera orbits"
frames = 9
fps = 8
max_area = 4096
{extra}
[backbone]
name = "probe-tiny"
dit = {{ path = "dit" }}
vae = {{ path = "vae.pth" }}
text_encoder = {{ path = "te" }}
tokenizer = {{ path = "tok" }}
image_encoder = {{ path = "ie" }}
sampler = {sampler}
"""
DISTILL = '{ kind = "distill", timesteps = [1000, 750, 500, 250] }'


def write_preset(path, extra: str = "", sampler: str = DISTILL, **fields):
    text = PRESET.format(extra=extra, sampler=sampler)
    for key, value in fields.items():  # replace a top-level field
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
    path.write_text(text)
    return path


def cine(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False, prog_name="cine")


@pytest.fixture
def loud_loaders(monkeypatch):
    """Every way a run could start loading or reading becomes an AssertionError."""
    import cinecli.batch.worker
    import cinecli.generate.pipeline
    import cinecli.models
    import cinecli.run
    import cinecli.weights.hub

    def boom(*a, **k):
        raise AssertionError("something was loaded before the bad value was caught")

    for target, name in ((cinecli.weights.hub, "resolve_all"), (cinecli.models, "load_dit"), (cinecli.run, "read_image"),
                         (cinecli.generate.pipeline.Generator, "generate"), (cinecli.batch.worker.Worker, "__init__")):
        monkeypatch.setattr(target, name, boom)


@pytest.fixture
def files(tmp_path, env):
    photo = tmp_path / "photo.png"
    sample_image(96, 64).save(photo)
    (tmp_path / "in").mkdir()
    sample_image(64, 48).save(tmp_path / "in" / "a.png")
    return {"photo": photo, "indir": tmp_path / "in", "out": tmp_path / "out", "tmp": tmp_path,
            "preset": write_preset(tmp_path / "good.toml")}


RUN = ("run", "{photo}", "--preset", "{preset}", "-o", "{out}.mp4")
BATCH = ("batch", "{indir}", "--preset", "{preset}", "-o", "{out}")
# (id, argv, environment, expected words of the one-line error); "{bad}" is a preset written from "fields"
BAD_VALUES = [
    ("frames-0", (*RUN, "--frames", "0"), None, "--frames 0: must be between 1 and 161"),
    ("frames-huge", (*RUN, "--frames", "100000"), None, "--frames 100000"),
    ("fps-0", (*RUN, "--fps", "0"), None, "--fps 0: must be between 1"),
    ("fps-negative", (*RUN, "--fps", "-1"), None, "--fps -1"),
    ("fps-huge", (*RUN, "--fps", "100000"), None, "--fps 100000"),
    ("seed-65-bits", (*RUN, "--seed", str(2**64)), None, "--seed 18446744073709551616"),
    ("seed-negative", (*RUN, "--seed", "-1"), None, "--seed -1"),
    ("strength-nan", (*RUN, "--strength", "nan"), None, "--strength nan: must be a finite number"),
    ("strength-inf", (*RUN, "--strength", "inf"), None, "--strength inf: must be a finite number"),
    ("strength-1e30", (*RUN, "--strength", "1e30"), None, "--strength 1e+30: must be between -10 and 10"),
    ("steps-0", (*RUN, "--steps", "0"), None, "--steps 0"),
    ("steps-huge", (*RUN, "--steps", "100000"), None, "--steps 100000"),
    ("crf-negative", (*RUN, "--crf", "-1"), None, "--crf -1: must be between 0 and 51"),
    ("crf-52", (*RUN, "--crf", "52"), None, "--crf 52"),
    ("dtype-fp8", (*RUN, "--dtype", "fp8"), None, "--dtype fp8: must be one of auto, bf16, fp16, fp32"),
    ("device-tpu", (*RUN, "--device", "tpu"), None, "--device tpu: must be auto, cpu, cuda, cuda:N or mps"),
    ("device-cuda-x", (*RUN, "--device", "cuda:x"), None, "--device cuda:x"),
    ("fit", (*RUN, "--fit", "squash"), None, "--fit squash"),
    ("sampler", (*RUN, "--sampler", "ddim"), None, "--sampler ddim: must be one of"),
    ("effect-twice", ("bullet-time", "{photo}", "--effect", "slowmo"), None, "the effect is named twice"),
    ("effect-and-preset", ("bullet-time", "{photo}", "--preset", "{preset}"), None, "both an effect ('bullet-time') and --preset"),
    ("run-e-and-preset", ("run", "{photo}", "-e", "slowmo", "--preset", "{preset}"), None, "both an effect"),
    ("batch-e-and-preset", ("batch", "{indir}", "-e", "slowmo", "--preset", "{preset}", "-o", "{out}"), None, "both an effect"),
    ("batch-frames-0", (*BATCH, "--frames", "0"), None, "--frames 0"),
    ("batch-fps-0", (*BATCH, "--fps", "0"), None, "--fps 0"),
    ("batch-crf", (*BATCH, "--crf", "99"), None, "--crf 99"),
    ("batch-seed", (*BATCH, "--seed", "-5"), None, "--seed -5"),
    ("batch-dtype", (*BATCH, "--dtype", "fp8"), None, "--dtype fp8"),
    ("batch-device", (*BATCH, "--device", "tpu"), None, "--device tpu"),
    ("world-size-word", BATCH, {"RANK": "0", "WORLD_SIZE": "four"}, "WORLD_SIZE='four' is not a whole number"),
    ("rank-too-big", BATCH, {"RANK": "4", "WORLD_SIZE": "4"}, "shard 4/4 from RANK=4 WORLD_SIZE=4 is out of range"),
    ("world-size-0", BATCH, {"RANK": "0", "WORLD_SIZE": "0"}, "out of range"),
    ("slurm-list", BATCH, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
                           "SLURM_ARRAY_TASK_COUNT": "3"}, "pass --shard i/3"),
    ("preset-frames-0", ("run", "{photo}", "--preset", "{bad}"), {"fields": {"frames": "0"}}, "frames = 0: must be between 1"),
    ("preset-fps-0", ("run", "{photo}", "--preset", "{bad}"), {"fields": {"fps": "0"}}, "fps = 0"),
    ("preset-max-area-0", ("run", "{photo}", "--preset", "{bad}"), {"fields": {"max_area": "0"}}, "max_area = 0"),
    ("preset-frames-text", ("run", "{photo}", "--preset", "{bad}"), {"fields": {"frames": '"many"'}}, "wrong type"),
    ("preset-timesteps-empty", ("run", "{photo}", "--preset", "{bad}"), {"sampler": '{ kind = "distill", timesteps = [] }'},
     "timesteps = (): must list at least one timestep"),
    ("preset-timesteps-order", ("run", "{photo}", "--preset", "{bad}"),
     {"sampler": '{ kind = "distill", timesteps = [250, 1000] }'}, "must be strictly decreasing"),
    ("preset-euler-steps-0", ("run", "{photo}", "--preset", "{bad}"), {"sampler": '{ kind = "euler", steps = 0 }'}, "steps = 0"),
    ("preset-strength-nan", ("run", "{photo}", "--preset", "{bad}"), {"extra": "effect_strength = nan"}, "effect_strength = nan"),
    ("batch-preset-frames-0", ("batch", "{indir}", "--preset", "{bad}", "-o", "{out}"), {"fields": {"frames": "0"}}, "frames = 0"),
]


@pytest.mark.parametrize("argv,environment,expected", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_fail_in_one_line_before_anything_loads(files, loud_loaders, argv, environment, expected):
    environment = dict(environment or {})
    preset_spec = {k: environment.pop(k) for k in ("fields", "sampler", "extra") if k in environment}
    if preset_spec:
        files["bad"] = write_preset(files["tmp"] / "bad.toml", extra=preset_spec.get("extra", ""),
                                    sampler=preset_spec.get("sampler", DISTILL), **preset_spec.get("fields", {}))
    r = cine(*(a.format(**files) for a in argv), env=environment)
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cine: error:"), r.stderr
    assert expected in lines[0], lines[0]
    assert not files["out"].exists() and not (files["tmp"] / "out.mp4").exists()


def test_unavailable_but_valid_device_stays_exit_7(backbone, files, monkeypatch):
    import torch

    import cinecli.models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU box, even where a GPU is present
    monkeypatch.setattr(cinecli.models, "load_dit", lambda *a, **k: pytest.fail("loaded a model"))
    r = cine("run", files["photo"], "--preset", backbone, "-o", files["tmp"] / "o.mp4", "--device", "cuda:1")
    assert r.exit_code == 7 and "CUDA was asked for but no CUDA device is available" in r.stderr, r.output


def test_options_that_do_nothing_warn(files):
    r = cine("slowmo", files["photo"], "--strength", "0.5", "--dry-run")  # slow-motion has no effect LoRA
    assert r.exit_code == 0, r.output
    assert "warning: --strength does nothing here: effect slow-motion has no effect LoRA" in r.stderr
    r = cine("bullet-time", files["photo"], "--negative-prompt", "blurry", "--dry-run")  # distilled: no CFG
    assert r.exit_code == 0, r.output
    assert "warning: --negative-prompt does nothing here" in r.stderr
    quiet = cine("bullet-time", files["photo"], "--strength", "0.5", "--dry-run")  # bullet-time has a LoRA: no warning
    assert "--strength" not in quiet.stderr


def test_slurm_stepped_arrays_shard_by_index():
    # sbatch --array=0-31:2 → tasks 0, 2, …, 30: sixteen shards, each task its own
    base = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "30", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "16"}
    shards = [parse_shard(None, {**base, "SLURM_ARRAY_TASK_ID": str(t)}) for t in range(0, 31, 2)]
    assert shards == [(i, 16) for i in range(16)]
    # --array=4-20:4 → 4, 8, …, 20 (count from the bounds when Slurm's count is the same)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "20",
                              "SLURM_ARRAY_TASK_STEP": "4", "SLURM_ARRAY_TASK_COUNT": "5"}) == (2, 5)
    with pytest.raises(UsageError, match="not on an evenly spaced range"):
        parse_shard(None, {**base, "SLURM_ARRAY_TASK_ID": "3"})


# --- conventions: -h, --version, did-you-mean, usage lines ----------------------------------------------------------
def test_help_version_and_did_you_mean(env):
    assert cine("-h").exit_code == 0 and "Usage: cine" in cine("-h").stdout
    assert cine("--version").stdout.strip() == __version__
    r = cine("efects")
    assert r.exit_code == 2 and r.stderr.strip() == "cine: error: No such command 'efects'. Did you mean 'effects'?"
    r = cine("bulet-time", "photo.jpg")
    assert r.exit_code == 2 and "did you mean 'bullet-time'" in r.stderr
    for argv, usage in ((("bullet-time", "--help"), "Usage: cine bullet-time PHOTO [OPTIONS]"),
                        (("bulletti", "-h"), "Usage: cine bulletti PHOTO [OPTIONS]"),
                        (("run", "--help"), "Usage: cine run PHOTO [OPTIONS]"),
                        (("batch", "-h"), "Usage: cine batch INPUTS... [OPTIONS]")):
        r = cine(*argv)
        assert r.exit_code == 0 and r.stdout.splitlines()[0] == usage, r.stdout
        assert not re.search(r"<(str|int|float|path)>|\{(image|inputs|PHOTO)\}", r.stdout), r.stdout
    assert "--seed N" in cine("run", "--help").stdout


# --- photos of extreme shape ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,words", [((4000, 10), "photo 4000x10 is smaller than 16 px"),
                                        ((4000, 100), "photo 4000x100 has an aspect ratio of 40.0:1; cine takes up to 4:1"),
                                        ((20000, 8), "photo 20000x8"), ((1, 1), "photo 1x1 is smaller than 16 px")])
def test_extreme_photo_shapes_are_refused_with_the_numbers(env, tmp_path, size, words):
    from PIL import Image

    path = tmp_path / "odd.png"
    Image.new("RGB", size, (90, 120, 200)).save(path)
    r = CliRunner().invoke(app, ["bullet-time", str(path), "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 3, r.output
    assert r.stderr.strip().splitlines() == [f"cine: error: {r.stderr.strip().removeprefix('cine: error: ')}"]
    assert words in r.stderr


def test_frame_sizes_keep_the_pixel_budget_and_warn_on_enlarging(env, tmp_path):
    import json

    from PIL import Image

    from cinecli.generate.image import MAX_ASPECT, target_size

    for budget in (32 * 32, 4096, 480 * 832, 720 * 1280):
        for long in (16, 17, 63, 100, 1000, 4000, 20000):
            for short in {max(16, round(long / MAX_ASPECT)), max(16, long // 2), long}:
                for w, h in ((long, short), (short, long)):
                    if max(w, h) / min(w, h) > MAX_ASPECT:
                        continue
                    fw, fh = target_size(w, h, budget)
                    assert fw * fh <= budget and fw % 16 == 0 and fh % 16 == 0, (w, h, budget, fw, fh)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (90, 120, 200)).save(small)
    r = CliRunner().invoke(app, ["bullet-time", str(small), "--dry-run", "--json"], catch_exceptions=False)
    doc = json.loads(r.stdout)
    scale = max(doc["width"] / 40, doc["height"] / 30)
    assert f"warning: photo 40x30 is enlarged {scale:.1f}x to {doc['width']}x{doc['height']}; expect a soft video" in r.stderr


# --- one broken user preset does not break the others -----------------------------------------------------------------
def test_malformed_user_preset_is_skipped_with_a_warning(env, files):
    import json

    user = files["tmp"] / "config" / "cine" / "presets"  # XDG_CONFIG_HOME from the env fixture
    user.mkdir(parents=True)
    (user / "broken.toml").write_text('name = "broken\nprompt = [')
    (user / "zero.toml").write_text('name = "zero"\nbackbone = "wan2.1-i2v-14b-480p-4step"\nprompt = "p"\nframes = 0\n')
    (user / "mine.toml").write_text('name = "mine"\nbackbone = "wan2.1-i2v-14b-480p-4step"\nprompt = "a slow orbit"\n')
    r = cine("effects", "--json")
    assert r.exit_code == 0, r.output
    assert {e["effect"] for e in json.loads(r.stdout)} == {"bullet-time", "dolly-zoom", "slow-motion", "orbit", "mine"}
    assert f"cine: warning: skipping user preset 'broken': malformed TOML in {user / 'broken.toml'}" in r.stderr
    assert f"skipping user preset 'zero': preset {user / 'zero.toml'}: frames = 0" in r.stderr
    assert cine("slowmo", files["photo"], "--dry-run").exit_code == 0
    assert cine("mine", files["photo"], "--dry-run").exit_code == 0
    assert cine("models", "list", "--json").exit_code == 0
    doctor = cine("doctor", "--no-selftest", "--json")
    assert doctor.exit_code == 0, doctor.output
    problems = json.loads(doctor.stdout)["environment"]["preset_problems"]
    assert set(problems) == {"broken", "zero"} and "malformed TOML" in problems["broken"]
    assert "skipped user preset broken" in cine("doctor", "--no-selftest").stdout
    # named explicitly, a skipped preset says why; as --preset FILE a malformed file stays an error
    assert "malformed TOML" in cine("broken", files["photo"]).stderr
    r = cine("run", files["photo"], "--preset", user / "broken.toml")
    assert r.exit_code == 2 and "malformed TOML" in r.stderr


# --- logs: one record per line, progress per stage -----------------------------------------------------------------------
def test_non_terminal_stderr_has_unwrapped_lines_and_stage_progress(backbone, env, files):
    r = cine("run", files["photo"], "--preset", backbone, "--steps", "2", "--dry-run")
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning: this backbone is distilled")]
    assert len(warning) == 1 and len(warning[0]) > 80 and warning[0].endswith("usually look worse"), r.stderr
    out = files["tmp"] / "clip.mp4"
    r = cine("run", files["photo"], "--preset", backbone, "-o", out, "--seed", "1")
    assert r.exit_code == 0, r.output
    stages = [line.split("] ", 1)[1].rsplit(":", 1)[0] for line in r.stderr.splitlines() if line.startswith("cine: [")]
    assert stages[0] == "resolve" and stages[-1] == "mp4 encode", r.stderr
    assert {"load dit", "denoise step 1/4", "denoise step 4/4", "vae decode"} <= set(stages)
    assert not [line for line in cine("run", files["photo"], "--preset", backbone, "-o", out, "--overwrite", "-q").stderr.splitlines()
                if line.startswith("cine: [")]  # -q: nothing but the path


# --- models path and doctor tell scripts and newcomers what to do ----------------------------------------------------
def test_models_path_exits_4_when_weights_are_missing(env):
    r = cine("models", "path", "bullet-time")
    assert r.exit_code == 4 and "dit: missing" in r.stderr


def test_doctor_prints_the_selftest_preset_and_a_command_that_runs(backbone, env, tmp_path, monkeypatch):
    import shlex
    import shutil

    shutil.copytree(backbone.parent, tmp_path / "cache" / "selftest")  # CINE_CACHE_DIR: skip rewriting the stack
    r = cine("doctor")
    assert r.exit_code == 0, r.output
    preset = tmp_path / "cache" / "selftest" / "selftest.toml"
    assert f"self-test preset: {preset}" in r.stdout
    example = next(line for line in r.stdout.splitlines() if line.strip().startswith("try it: ")).split("try it: ", 1)[1]
    argv = shlex.split(example)
    assert argv[0] == "cine" and str(preset) in argv
    monkeypatch.chdir(tmp_path)
    done = cine(*argv[1:])
    assert done.exit_code == 0 and (tmp_path / "selftest.mp4").stat().st_size > 0, done.output


def test_readme_documents_every_cine_variable_and_the_cpu_wheel_index():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    used = {m for f in (root / "cinecli").rglob("*.py") for m in re.findall(r"\bCINE_[A-Z_]+\b", f.read_text())}
    readme = (root / "README.md").read_text()
    assert used >= {"CINE_CACHE_DIR", "CINE_DATA_DIR", "CINE_DEBUG"}
    assert not {v for v in used if f"`{v}" not in readme}, "undocumented environment variables"
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
