"""`didr export` (didr/export.py, didr/stages/export.py): an align run as a diffusers pipeline folder that diffusers
loads alone, in a fresh process where didr cannot be imported, and whose call gives the library sampler's images to
1e-5, per family: the embedded world's teacher (pixel UNet, v-prediction, zero terminal SNR, full fine-tuning,
through the `didr` command), tiny SD (latent UNet, epsilon, LoRA merged), SDXL (added time ids and pooled
embeddings), SD3 (rectified flow, LoRA kept for `load_lora_weights`), PixArt-alpha (T5 with its mask, learned
sigma), FLUX.1-dev (packed latents, guidance embedding) and Z-Image (Qwen3 captions, its own CFG convention); K-step
generators (deterministic DDIM / Euler over their times) on SD and the embedded world. The model card's metrics are
the report's table."""

import json
import subprocess
import sys
import sysconfig
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pipeline_project import TINY, tiny_params
from safetensors.torch import save_file
from tiny_models import save_flux, save_pixart, save_sd, save_sd3, save_sdxl, save_zimage

from didr.backbones.base import Conditioning
from didr.backbones.tuning import add_lora
from didr.cli import main
from didr.config import FinetuneParams, GeneratorParams, Params, PromptParams, TeacherParams, load_params
from didr.diffusion import FlowSchedule, VPSchedule, sd_vp_config
from didr.export import (
    CALL_FILE,
    base_state,
    check_pipeline,
    generator_times,
    merged_state,
    params_digest,
    pipeline_arguments,
    plain_network,
    read_card,
    sampler_scheduler,
    write_export,
)
from didr.fewstep import FewStepGenerator
from didr.stages.common import generator_record, load_teacher, new_generator
from didr.stages.export import run_export
from didr.stages.io import save_weights
from didr.stages.report import collect

RUN = "method=didr/beta=0.5/seed=0"
PROMPTS = ["red circle", "blue square"]
SUMMARY = {"method": "didr", "setting": "beta=0.5", "strength": 0.5, "fid_real": 812.25, "kid_real": 0.0625,
           "toy_preference_mean": 3.125, "toy_preference_std": 0.5, "match_shape": 0.875}  # fmt: skip


# ------------------------------------------------------------------------------------------------ fast: the maths


@pytest.mark.parametrize("zero_snr", [False, True])
def test_vp_scheduler_starts_at_t_star_with_the_schedules_sigma(zero_snr):
    config = {**sd_vp_config(), "rescale_betas_zero_snr": zero_snr, "prediction_type": "v_prediction"}
    schedule = VPSchedule.from_scheduler_config(config)
    scheduler, call = sampler_scheduler(config, schedule, [0.9])
    a, s = schedule.alpha_sigma(torch.tensor([0.9]))
    assert call["sigmas"] == [float(s / a), 0.0] and call["guidance_scale"] == 1.0
    scheduler.set_timesteps(sigmas=call["sigmas"])
    assert abs(float(scheduler.timesteps[0]) - 0.9 * 999) < 1e-4  # the timestep the adapter feeds: t* (T - 1)
    sigma = float(s / a)
    assert float(scheduler.init_noise_sigma) == pytest.approx((sigma**2 + 1) ** 0.5, rel=1e-6)  # x_{t*} = z


def test_flow_scheduler_is_one_euler_step_from_t_star():
    scheduler, call = sampler_scheduler({"num_train_timesteps": 1000, "shift": 3.0}, FlowSchedule(1000), [0.75])
    scheduler.set_timesteps(sigmas=call["sigmas"])
    assert call["sigmas"] == [0.75] and scheduler.timesteps.tolist() == [750.0]  # shift 3 dropped
    z, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(scheduler.step(v, scheduler.timesteps[0], z).prev_sample, z - 0.75 * v)


def test_merged_lora_network_equals_the_adapted_one():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )  # fmt: skip
    add_lora(SimpleNamespace(net=unet), rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([500.0, 900.0]), torch.randn(2, 16, 32)
    with torch.no_grad():
        adapted = unet(x, t, text).sample
        merged = plain_network(unet, merged_state(unet))(x, t, text).sample
        base = plain_network(unet, base_state(unet))(x, t, text).sample
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (base - adapted).abs().max() > 1e-2  # the adapters matter


def test_k_step_schedulers_walk_the_generators_times():
    config = {**sd_vp_config(), "prediction_type": "epsilon"}
    schedule, times = VPSchedule.from_scheduler_config(config), [1.0, 0.75, 0.5, 0.25]
    scheduler, call = sampler_scheduler(config, schedule, times)
    a, s = schedule.alpha_sigma(torch.tensor(times))
    assert call["num_inference_steps"] == 4 and call["sigmas"] == [*(s / a).tolist(), 0.0]
    scheduler.set_timesteps(sigmas=call["sigmas"])
    assert (scheduler.timesteps - torch.tensor(times) * 999).abs().max() < 1e-3  # the adapter's t (T - 1)
    flow, flow_call = sampler_scheduler({"num_train_timesteps": 1000, "shift": 3.0}, FlowSchedule(1000), times)
    flow.set_timesteps(sigmas=flow_call["sigmas"])
    assert flow.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0] and flow.sigmas[-1] == 0


def adapter_of(pipe):
    """didr's adapter over a loaded pipeline's own components (sharing its network)."""
    from didr.backbones.loading import denoiser_from_components

    return denoiser_from_components(type(pipe).__name__, pipe.components, "fp32", pipe.config)


def test_k_step_export_call_reproduces_the_deterministic_sampler_in_process(tmp_path):
    """The tiny SD pipeline with the teacher's own network as a 3-step generator at uneven times: the exported
    scheduler and call give the generator's DDIM sample (latents, before the VAE); the pipeline's own DDIM with 3
    steps does not."""
    from diffusers import DiffusionPipeline

    save_sd(tmp_path / "sd", latent=True)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    adapter = adapter_of(pipe)
    generator = FewStepGenerator(adapter, steps=3, times=[0.97, 0.6, 0.3]).eval()
    assert generator_times(generator) == torch.tensor([0.97, 0.6, 0.3]).tolist()
    stock_scheduler = pipe.scheduler
    scheduler, call = sampler_scheduler(pipe.scheduler.config, adapter.schedule, generator_times(generator))
    z = torch.randn((2, *adapter.sample_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = generator(z, adapter.encode_prompts(PROMPTS))
        pipe.scheduler = scheduler
        got = pipe(PROMPTS, **call, latents=z, output_type="latent").images
        pipe.scheduler = stock_scheduler
        stock = pipe(PROMPTS, num_inference_steps=3, guidance_scale=1.0, latents=z, output_type="latent").images
    scale = float(expected.abs().max())  # untrained eps-prediction latents reach ~10 at t_0 = 0.97
    assert float((got - expected).abs().max()) < 1e-6 * scale
    assert float((stock - expected).abs().max()) > 1e-2 * scale  # the times matter


def test_pipeline_arguments_match_the_adapters_prompts_and_sizes():
    clip, t5 = SimpleNamespace(is_clip=True, window=12), SimpleNamespace(is_clip=False, window=16)
    assert pipeline_arguments("StableDiffusionPipeline", [clip], (64, 64)) == {}
    assert pipeline_arguments("StableDiffusion3Pipeline", [clip, clip, t5], (64, 64)) == {"max_sequence_length": 16}
    assert pipeline_arguments("PixArtAlphaPipeline", [t5], (64, 64)) == {
        "clean_caption": False, "use_resolution_binning": False, "max_sequence_length": 16}  # fmt: skip
    assert pipeline_arguments("FluxPipeline", [clip, t5], (32, 48)) == {
        "max_sequence_length": 16, "height": 32, "width": 48}  # fmt: skip
    qwen = SimpleNamespace(is_clip=False, window=48)
    assert pipeline_arguments("ZImagePipeline", [qwen], (32, 32)) == {
        "guidance_scale": 0.0, "max_sequence_length": 48, "height": 32, "width": 32}  # fmt: skip


def test_unverified_pipelines_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"model_index\.json: cannot export a PixArtSigmaPipeline"):
        check_pipeline("PixArtSigmaPipeline", "model_index.json")
    clip_only = [SimpleNamespace(is_clip=True, window=12)] * 2  # the embedded flow world: no T5
    with pytest.raises(ValueError, match="without text_encoder_3"):
        pipeline_arguments("StableDiffusion3Pipeline", clip_only, (64, 64))


def test_keeping_a_lora_for_a_pipeline_without_a_lora_loader_stops_before_writing(tmp_path):
    from diffusers import DiffusionPipeline

    save_pixart(tmp_path / "pixart")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pixart")
    add_lora(SimpleNamespace(net=pipe.transformer), rank=4)
    scheduler, call = sampler_scheduler(
        pipe.scheduler.config, VPSchedule.from_scheduler_config(pipe.scheduler.config), [0.9]
    )
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(ValueError, match=r"export\.lora: keep needs a pipeline that loads LoRAs; PixArtAlphaPipeline"):
        write_export(pipe, pipe.transformer, scheduler, call, "keep", out, "card")
    assert not any(out.iterdir())


# ------------------------------------------------------------------------------------------- fast: bad input


def export_cli(tmp_path, run_dir, out, *extra):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    scores = tmp_path / "scores"
    scores.mkdir(exist_ok=True)
    (scores / "summary.json").write_text(json.dumps(SUMMARY))
    args = ["export", "--params", str(params), "--teacher", str(tmp_path / "teacher"), "--run", str(run_dir)]
    return main([*args, "--scores", str(scores), "--out", str(out), "--quiet", *extra])


def test_a_missing_run_stops_in_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "align" / RUN
    assert export_cli(tmp_path, missing, tmp_path / "export") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(missing) in error and "not an align run" in error
    assert not (tmp_path / "export").exists()


def test_a_non_empty_output_stops_in_one_line_naming_it(tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert export_cli(tmp_path, tmp_path / "align" / RUN, out) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"--out {out}: exists and is not an empty folder" in error
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_keeping_the_lora_of_a_full_fine_tuning_run_stops(tmp_path, capsys):
    run = tmp_path / "align" / RUN
    run.mkdir(parents=True)
    (run / "generator.safetensors").write_bytes(b"")
    (run / "params.json").write_text(json.dumps({"params": asdict(load_params(TINY / "tiny_params.yaml"))}))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "params.json").write_text(json.dumps({"params": {"teacher": {"kind": "vp"}}}))
    assert export_cli(tmp_path, run, tmp_path / "export", "--set", "export.lora=keep") == 2
    error = capsys.readouterr().err.strip()
    assert "export.lora: keep needs a LoRA run" in error and str(run) in error
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------- integration: three families, diffusers alone


def aligned_run(teacher_dir: Path, params: dict, run_dir: Path, seed: int) -> None:
    """An align output folder: the generator of `params` with every trained tensor moved by seeded noise (so an
    export of the teacher's own network would not match), its params.json as the align stage writes it."""
    generator = new_generator(load_teacher(teacher_dir, torch.device("cpu")), params)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in generator.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=noise))
    run_dir.mkdir(parents=True)
    save_weights(generator, run_dir / "generator.safetensors")
    record = {"stage": "align", "method": "didr", "strength": 0.5, "seed": 0, "run": RUN, "setting": "beta=0.5",
              "params": params, "generator": generator_record(generator)}  # fmt: skip
    (run_dir / "params.json").write_text(json.dumps(record))


def scores(folder: Path, fid: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({**SUMMARY, "fid_real": fid}))
    return folder


def pretrained(root: Path, save, lora: str, steps: int = 1) -> tuple[Path, Path]:
    """A tiny pretrained pipeline, its teacher stage, a LoRA align run of a `steps`-step generator and its scores,
    exported with `lora`."""
    save(root / "model")
    prompts = PromptParams(train=str(TINY / "tiny_train.txt"), eval=str(TINY / "tiny_eval.txt"))
    params = Params(teacher=TeacherParams(kind="pretrained", source=str(root / "model")), prompts=prompts,
                    finetune=FinetuneParams(lora_rank=4))  # fmt: skip
    params = replace(params, export=replace(params.export, lora=lora))
    params = replace(params, warmup=replace(params.warmup, generator=GeneratorParams(steps=steps)))
    from didr.stages.teacher import run_teacher

    run_teacher(params, root / "teacher", progress=False)
    aligned_run(root / "teacher", asdict(params), root / "align", seed=1)
    run_export(params, root / "teacher", root / "align", scores(root / "scores", 17.5), root / "export")
    return root / "teacher", root / "export"


PRETRAINED = [  # family, its tiny pipeline, how the LoRA is exported, generator steps (K steps on SD: in-process)
    ("sd", lambda f: save_sd(f, latent=True), "merge", 1),
    ("sd3", save_sd3, "keep", 1),
    ("sdxl", save_sdxl, "merge", 1),
    ("pixart", save_pixart, "merge", 1),
    ("flux", save_flux, "keep", 1),
    ("zimage", save_zimage, "merge", 1),
]
TOLERANCE = {"embedded-4-step": 1e-4}  # zero terminal SNR at t_0 = 1: Euler's float32 step from sigma 4096
# cancels 4096-sized numbers (docs/export.md); every other family: 1e-5


@pytest.fixture(scope="module")
def exported(tiny_teacher, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """family -> (teacher stage folder, export folder, scores folder)."""
    root = tmp_path_factory.mktemp("export")
    params_file = tiny_teacher.parent / "params.yaml"
    aligned_run(tiny_teacher, asdict(load_params(params_file)), root / "embedded" / "align", seed=0)
    args = [
        "export",
        "--params",
        str(params_file),
        "--teacher",
        str(tiny_teacher),
        "--run",
        str(root / "embedded/align"),
    ]
    embedded_scores = scores(root / "embedded" / "scores", 812.25)
    out = root / "embedded" / "export"
    assert main([*args, "--scores", str(embedded_scores), "--out", str(out), "--quiet"]) == 0
    families = {"embedded": (tiny_teacher, out, embedded_scores)}
    few = root / "embedded-4-step"
    params = load_params(params_file)
    params = replace(params, warmup=replace(params.warmup, generator=GeneratorParams(steps=4)))
    aligned_run(tiny_teacher, asdict(params), few / "align", seed=2)
    run_export(params, tiny_teacher, few / "align", scores(few / "scores", 812.25), few / "export")
    families["embedded-4-step"] = (tiny_teacher, few / "export", few / "scores")
    for name, save, lora, steps in PRETRAINED:
        teacher, export = pretrained(root / name, save, lora, steps)
        families[name] = (teacher, export, root / name / "scores")
    return families


def library_images(teacher_dir: Path, run_dir: Path, z: torch.Tensor) -> torch.Tensor:
    """What `didr sample` computes for `z` and PROMPTS: decode(g(z, c)) clamped to [0, 1]."""
    from didr.stages.common import load_generator

    teacher = load_teacher(teacher_dir, torch.device("cpu"))
    generator = load_generator(teacher, run_dir)
    cond: Conditioning = teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        return teacher.decode(generator(z, cond)).clamp(0, 1)


ALONE = """
import json, sys
sys.path.append(sys.argv[1])  # the environment's packages, without their .pth hooks (didr's editable install)
try:
    import didr
    sys.exit("didr is importable")
except ImportError:
    pass
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

for job in json.load(open(sys.argv[2])):
    folder = job["folder"]
    index = json.load(open(folder + "/model_index.json"))
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    if job["lora"]:
        pipe.load_lora_weights(folder)
    call = json.load(open(folder + "/sampler_call.json"))
    z = load_file(job["latents"])["z"]
    if job["packed"]:  # FLUX takes its latents as 2x2-patch tokens
        z = pipe._pack_latents(z, *z.shape)
    pixels = pipe.vae is None
    with torch.no_grad():
        images = pipe(list(job["prompts"]), **call, latents=z, output_type="latent" if pixels else "pt").images
    images = ((images + 1) / 2).clamp(0, 1) if pixels else images
    card = open(folder + "/README.md").read()
    scope = {}
    exec(card.split("```python\\n")[1].split("```")[0], scope)  # the model card's snippet, as typed
    save_file({"images": images.contiguous(), "snippet": scope["images"].contiguous()}, job["out"])
print("didr not importable; loaded", len(json.load(open(sys.argv[2]))), "pipelines")
"""


@pytest.mark.integration  # teacher stages, eight exports and a fresh python process
def test_diffusers_alone_reproduces_the_sampler(exported, tmp_path):
    jobs, expected = [], {}
    for name, (teacher, export, _) in exported.items():
        shape = load_teacher(teacher, torch.device("cpu")).sample_shape
        z = torch.randn((2, *shape), generator=torch.Generator().manual_seed(7))
        save_file({"z": z}, tmp_path / f"{name}-z.safetensors")
        expected[name] = library_images(teacher, export.parent / "align", z)
        lora = (export / "pytorch_lora_weights.safetensors").is_file()
        jobs.append({"folder": str(export), "prompts": PROMPTS, "latents": str(tmp_path / f"{name}-z.safetensors"),
                     "out": str(tmp_path / f"{name}.safetensors"), "lora": lora, "packed": name == "flux"})  # fmt: skip
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "alone.py").write_text(ALONE)
    site = sysconfig.get_paths()["purelib"]
    command = [sys.executable, "-I", "-S", "alone.py", site, "jobs.json"]
    done = subprocess.run(command, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"didr not importable; loaded {len(jobs)} pipelines" in done.stdout
    from safetensors.torch import load_file

    for name, images in expected.items():
        got = load_file(tmp_path / f"{name}.safetensors")
        torch.testing.assert_close(got["images"], images, atol=TOLERANCE.get(name, 1e-5), rtol=0, msg=name)
        assert got["snippet"].shape[0] == 1 and got["snippet"].shape[1:] == images.shape[1:], name


@pytest.mark.integration
def test_weights_are_safetensors_and_a_kept_lora_loads_separately(exported):
    for name, (_, export, _) in exported.items():
        weights = [p for p in export.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors")]
        assert weights and all(p.suffix == ".safetensors" for p in weights), name
    assert (exported["sd3"][1] / "pytorch_lora_weights.safetensors").is_file()  # kept: load_lora_weights
    assert not (exported["sd"][1] / "pytorch_lora_weights.safetensors").is_file()  # merged into the UNet


@pytest.mark.integration
def test_model_card_metrics_are_the_report_table_row(exported):
    for name, (_, export, score_dir) in exported.items():
        card = read_card(export)
        row = collect([score_dir]).iloc[0]  # the report's table: one row per scored sample set
        numbers = {k: v for k, v in row.items() if isinstance(v, int | float)}
        assert card["didr"]["metrics"] == numbers and card["didr"]["metrics"]["fid_real"] in (812.25, 17.5), name
        assert card["didr"]["call"] == json.loads((export / CALL_FILE).read_text()), name
        assert card["didr"]["method"] == "didr" and card["didr"]["run"] == RUN and card["library_name"] == "diffusers"
        params = json.loads((export.parent / "align" / "params.json").read_text())["params"]
        assert card["didr"]["params_digest"] == params_digest(params)
    assert read_card(exported["embedded"][1])["license"] == "apache-2.0"
    one, few = read_card(exported["embedded"][1]), read_card(exported["embedded-4-step"][1])
    assert (one["didr"]["steps"], one["didr"]["t_star"], one["tags"][1]) == (1, 0.9, "one-step")
    assert (few["didr"]["steps"], few["didr"]["times"], few["tags"][1]) == (4, [1.0, 0.75, 0.5, 0.25], "few-step")
    assert len(few["didr"]["call"]["sigmas"]) == 5 and few["didr"]["call"]["num_inference_steps"] == 4
    assert read_card(exported["sd"][1])["base_model"] == str(exported["sd"][0].parent / "model")
