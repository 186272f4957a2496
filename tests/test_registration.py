"""Every registered op passes torch.library.opcheck and runs under torch.compile(fullgraph=True)."""
import pytest
import torch

from genkernels.kernels import NoiseSchedule, ddim_step, ddpm_step

SCHEDULE = NoiseSchedule.linear()


def _diffusion_args(device, with_noise, tensor_timesteps):
    sample = torch.randn(3, 4, 5, device=device)
    model_output = torch.randn(3, 4, 5, device=device)
    noise = torch.randn(3, 4, 5, device=device) if with_noise else None
    seed = None if with_noise else torch.tensor([11], device=device)
    table = SCHEDULE.kernel_table(torch.device(device))
    if tensor_timesteps:
        return model_output, sample, noise, seed, table, torch.tensor([5, 500, 999], device=device), 0, \
            torch.tensor([4, 499, -1], device=device), 0
    return model_output, sample, noise, seed, table, None, 600, None, 550


@pytest.mark.parametrize("with_noise", [True, False])
@pytest.mark.parametrize("tensor_timesteps", [True, False])
def test_opcheck_ddpm_step(with_noise, tensor_timesteps, device):
    args = _diffusion_args(device, with_noise, tensor_timesteps)
    torch.library.opcheck(torch.ops.genkernels.ddpm_step.default,
                          args + ("v_prediction", "fixed_small", True, 1.0, None, 1.0))


@pytest.mark.parametrize("with_noise", [True, False])
@pytest.mark.parametrize("tensor_timesteps", [True, False])
def test_opcheck_ddim_step(with_noise, tensor_timesteps, device):
    args = _diffusion_args(device, with_noise, tensor_timesteps)
    torch.library.opcheck(torch.ops.genkernels.ddim_step.default,
                          args + (0.5, "epsilon", True, 1.0, True, False, None, 1.0))


@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
def test_opcheck_guided_steps(op, device):
    model_output, sample, noise, seed, table, *timesteps = _diffusion_args(device, False, True)
    uncond = torch.randn_like(model_output)
    options = ("epsilon", "fixed_small", False, 1.0) if op == "ddpm_step" else (0.5, "epsilon", False, 1.0, True,
                                                                                   False)
    torch.library.opcheck(getattr(torch.ops.genkernels, op).default,
                          (model_output, sample, noise, seed, table, *timesteps) + options + (uncond, 7.5))


def test_diffusion_steps_compile_with_fullgraph(device):
    """A whole DDIM-then-DDPM update compiles into one graph with the fused ops inside, and matches eager."""
    def two_steps(model_output, sample, noise):
        x = ddim_step(model_output, 600, sample, SCHEDULE, prev_timestep=580, eta=0.5, noise=noise, impl="triton")
        return ddpm_step(model_output * 0.5, 580, x, SCHEDULE, noise=noise, impl="triton")

    model_output, sample, noise = (torch.randn(2, 3, 8, 8, device=device) for _ in range(3))
    compiled = torch.compile(two_steps, fullgraph=True)
    torch.testing.assert_close(compiled(model_output, sample, noise), two_steps(model_output, sample, noise),
                               rtol=1e-5, atol=1e-5)


def test_compiled_step_with_tensor_timesteps_checks_their_range(device):
    """Under torch.compile the range check of timestep tensors is an asynchronous assert inside the graph."""
    def step(model_output, sample, timesteps):
        return ddpm_step(model_output, timesteps, sample, SCHEDULE, noise=torch.zeros_like(sample), impl="triton")

    model_output, sample = torch.randn(2, 3, 8, device=device), torch.randn(2, 3, 8, device=device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    timesteps = torch.tensor([5, 999], device=device)
    torch.testing.assert_close(compiled(model_output, sample, timesteps), step(model_output, sample, timesteps))
    with pytest.raises(RuntimeError, match=r"timestep must lie in \[0, 1000\)"):
        compiled(model_output, sample, torch.tensor([5, 1000], device=device))
