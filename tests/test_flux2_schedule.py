"""FLUX.2's sigma schedule against the pipelines' compute_empirical_mu and diffusers' scheduler."""
import numpy as np
import pytest

from mmdit_jax import MMDiTError
from mmdit_jax.sampling.flux2_schedule import FLUX2_SCHEDULER, LARGE_SEQ_LEN, compute_empirical_mu, flux2_sigmas
from mmdit_jax.sampling.schedules import timesteps_of

# (image tokens, steps): both sides of the large-image branch, 1 step, the two fitted step counts
CASES = [(256, 4), (1024, 28), (4096, 50), (LARGE_SEQ_LEN, 1), (LARGE_SEQ_LEN + 1, 28), (16384, 50),
         (3, 10), (1536, 200), (6000, 7)]


def diffusers_schedule(num_steps, image_seq_len, sigmas=None):
    """What Flux2Pipeline's step 6 leaves in the scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as mu_of
    from diffusers.pipelines.flux2.pipeline_flux2 import retrieve_timesteps

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    timesteps, _ = retrieve_timesteps(sched, num_steps, "cpu", sigmas=sigmas,
                                      mu=mu_of(image_seq_len=image_seq_len, num_steps=num_steps))
    return sched.sigmas.numpy(), timesteps.numpy()


@pytest.mark.parametrize("seq_len,steps", CASES)
def test_mu_equals_both_pipelines(seq_len, steps):
    from diffusers.pipelines.flux2 import pipeline_flux2, pipeline_flux2_klein

    mu = compute_empirical_mu(seq_len, steps)
    assert mu == pipeline_flux2.compute_empirical_mu(seq_len, steps)
    assert mu == pipeline_flux2_klein.compute_empirical_mu(seq_len, steps)


def test_mu_branches_differ():
    # below the threshold mu depends on the step count, above it does not
    assert compute_empirical_mu(1024, 4) != compute_empirical_mu(1024, 50)
    assert compute_empirical_mu(LARGE_SEQ_LEN + 1, 4) == compute_empirical_mu(LARGE_SEQ_LEN + 1, 50)


@pytest.mark.parametrize("seq_len,steps", CASES)
def test_sigmas_equal_diffusers_scheduler(seq_len, steps):
    ref_sigmas, ref_timesteps = diffusers_schedule(steps, seq_len)
    ours = flux2_sigmas(steps, seq_len)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
    np.testing.assert_array_equal(ours, ref_sigmas)
    np.testing.assert_array_equal(timesteps_of(ours), ref_timesteps)


def test_given_sigmas_and_bad_input():
    custom = [1.0, 0.7, 0.45, 0.2]
    np.testing.assert_array_equal(flux2_sigmas(4, 2048, sigmas=custom), diffusers_schedule(4, 2048, custom)[0])
    assert FLUX2_SCHEDULER.use_dynamic_shifting
    with pytest.raises(MMDiTError, match="at least 1"):
        flux2_sigmas(0, 1024)
    with pytest.raises(MMDiTError, match="image_seq_len"):
        flux2_sigmas(4, 0)
