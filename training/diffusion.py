"""Linear-beta diffusion, the improved-DDPM hybrid loss, and the three samplers exactly as the
server runs them (spec section 2 and src/diffusion/{schedule,sampler,guidance}.rs).

Sampler arithmetic mirrors the Rust code: every table is float64, each step's coefficients are
cast to float32, and the update is
    x0 = r1*x - r2*eps
    x' = a*x + b*eps + c*x0 + d*x0_prev + [noise] * exp(logvar/2) * n
"""

import math

import numpy as np
import torch

T = 1000
GUIDED_CHANNELS = 3
POWER_COSINE_EXPONENT = 4.0


def base_betas():
    return np.linspace(1e-4, 0.02, T, dtype=np.float64)


def respaced_timesteps(steps):
    """round(i*999/(S-1)) with the stride accumulated in float64 and ties rounded to even."""
    stride = (T - 1) / (steps - 1)
    cur, out = 0.0, []
    for _ in range(steps):
        out.append(int(round(cur)))  # Python's round() is round-half-even
        cur += stride
    return out


class Schedule:
    """Per-step tables, index 0 (cleanest) .. S-1, all float64 numpy arrays."""

    def __init__(self, steps=T):
        base_ac = np.cumprod(1.0 - base_betas())
        keep = respaced_timesteps(steps) if steps != T else list(range(T))
        betas, last = [], 1.0
        for k in keep:
            betas.append(1.0 - base_ac[k] / last)
            last = base_ac[k]
        b = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.concatenate([[1.0], ac[:-1]])
        self.timestep_map = np.array(keep, dtype=np.int64)
        self.betas = b
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.concatenate([[pv[1]], pv[1:]]))
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)

    @property
    def steps(self):
        return len(self.betas)


# --------------------------------------------------------------------------------------------
# Training loss
# --------------------------------------------------------------------------------------------


class TrainingTables:
    """Full 1000-step tables as float32 tensors for gathering by t during training."""

    def __init__(self, device):
        s = Schedule(T)
        f = lambda a: torch.tensor(a, dtype=torch.float32, device=device)
        self.sqrt_ac = f(np.sqrt(s.alphas_cumprod))
        self.sqrt_1m_ac = f(np.sqrt(1.0 - s.alphas_cumprod))
        self.sqrt_recip = f(s.sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1 = f(s.sqrt_recipm1_alphas_cumprod)
        self.coef1 = f(s.posterior_mean_coef1)
        self.coef2 = f(s.posterior_mean_coef2)
        self.log_beta = f(s.log_betas)
        self.log_post_var = f(s.posterior_log_variance_clipped)


def _g(table, t):
    return table[t][:, None, None, None]


def hybrid_loss(model, tabs, x0, y, t, noise):
    """Improved-DDPM hybrid objective L_simple + lambda*L_vlb with lambda = 1e-3 and L_vlb
    estimated from the sampled t as T*L_t, i.e. L_simple + L_t. L_simple is the eps MSE; L_t
    (in bits per dimension) trains only the variance interpolation v, because the mean it
    uses comes from a detached eps. At t = 0 the true posterior is a point mass, so L_0 is the
    Gaussian negative log-likelihood of x0 under the model's p(x_0 | x_1) (the latents are
    continuous, so no discretised decoder)."""
    c = x0.shape[1]
    xt = _g(tabs.sqrt_ac, t) * x0 + _g(tabs.sqrt_1m_ac, t) * noise
    out = model(xt, t, y).float()
    eps, v = out[:, :c], out[:, c:]
    mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))

    x0_hat = _g(tabs.sqrt_recip, t) * xt - _g(tabs.sqrt_recipm1, t) * eps.detach()
    mean = _g(tabs.coef1, t) * x0_hat + _g(tabs.coef2, t) * xt
    frac = (v + 1.0) / 2.0
    logvar = frac * _g(tabs.log_beta, t) + (1.0 - frac) * _g(tabs.log_post_var, t)
    true_mean = _g(tabs.coef1, t) * x0 + _g(tabs.coef2, t) * xt
    true_logvar = _g(tabs.log_post_var, t)
    kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                + (true_mean - mean).pow(2) * torch.exp(-logvar))
    nll = 0.5 * (math.log(2 * math.pi) + logvar + (x0 - mean).pow(2) * torch.exp(-logvar))
    vb = torch.where((t == 0)[:, None, None, None], nll, kl).mean(dim=(1, 2, 3)) / math.log(2.0)
    return mse.mean(), vb.mean()


# --------------------------------------------------------------------------------------------
# Sampling (mirrors src/diffusion/sampler.rs)
# --------------------------------------------------------------------------------------------


def guidance_scale_at(scale, schedule, t):
    scale = float(np.float32(scale))  # the server stores the scale as f32
    if schedule == "constant":
        return scale
    if schedule == "power-cosine":
        ramp = (1.0 - t / 1000.0) ** POWER_COSINE_EXPONENT
        return 1.0 + (scale - 1.0) * 0.5 * (1.0 - math.cos(math.pi * ramp))
    raise ValueError(f"unknown guidance schedule {schedule}")


def _coefficients(s, i, sampler, have_prev):
    k = dict(r1=s.sqrt_recip_alphas_cumprod[i], r2=s.sqrt_recipm1_alphas_cumprod[i],
             a=0.0, b=0.0, c=0.0, d=0.0, lmax=0.0, lmin=0.0, noise=False)
    if sampler == "ddpm":
        k.update(a=s.posterior_mean_coef2[i], c=s.posterior_mean_coef1[i], noise=i > 0,
                 lmax=s.log_betas[i], lmin=s.posterior_log_variance_clipped[i])
    elif sampler == "ddim":
        k.update(c=math.sqrt(s.alphas_cumprod_prev[i]), b=math.sqrt(1.0 - s.alphas_cumprod_prev[i]))
    elif sampler == "dpm-solver++":
        lam = lambda ac: 0.5 * math.log(ac / (1.0 - ac))
        ac_s, ac_t = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
        if i == 0:
            k["c"] = 1.0
        else:
            h = lam(ac_t) - lam(ac_s)
            alpha_t, sigma_t, sigma_s = math.sqrt(ac_t), math.sqrt(1.0 - ac_t), math.sqrt(1.0 - ac_s)
            kk = -alpha_t * math.expm1(-h)
            k["a"] = sigma_t / sigma_s
            if not have_prev:
                k["c"] = kk
            else:
                h_prev = lam(ac_s) - lam(s.alphas_cumprod[i + 1])
                r = h_prev / h
                k["c"] = kk * (1.0 + 1.0 / (2.0 * r))
                k["d"] = -kk / (2.0 * r)
    else:
        raise ValueError(f"unknown sampler {sampler}")
    return k


@torch.no_grad()
def sample(model, z, y, steps, sampler="ddpm", guidance_scale=1.0, guidance_schedule="constant",
           noise_fn=None, null_class=None, record=None):
    """Runs the server's sampler on latents z [B,C,H,W] (float32) with labels y [B].
    noise_fn(k) -> [B,C,H,W] gives the draw for iteration k (k = 0 is the noisiest step);
    it is only called where the sampler adds noise. Returns the final latent."""
    s = Schedule(steps)
    dev = z.device
    f32 = lambda v: torch.tensor(np.float32(v), device=dev)
    x = z.float()
    b, c = x.shape[:2]
    null = model.num_classes if null_class is None else null_class
    guided = float(np.float32(guidance_scale)) != 1.0
    x0_prev = None
    for k in range(steps):
        i = steps - 1 - k
        tt = int(s.timestep_map[i])
        t = torch.full((b,), tt, dtype=torch.long, device=dev)
        if guided:
            out = model(torch.cat([x, x]), torch.cat([t, t]),
                        torch.cat([y, torch.full_like(y, null)])).float()
            cond, unc = out[:b], out[b:]
            sc = f32(guidance_scale_at(guidance_scale, guidance_schedule, tt))
            n = min(GUIDED_CHANNELS, c)
            ge = unc[:, :n] + (cond[:, :n] - unc[:, :n]) * sc
            eps = torch.cat([ge, cond[:, n:c]], dim=1)
        else:
            cond = model(x, t, y).float()
            eps = cond[:, :c]
        v = cond[:, c:2 * c] if cond.shape[1] == 2 * c else None
        kf = _coefficients(s, i, sampler, x0_prev is not None)
        x0 = x * f32(kf["r1"]) - eps * f32(kf["r2"])
        nxt = (x * f32(kf["a"]) + eps * f32(kf["b"])) + x0 * f32(kf["c"])
        if kf["d"] != 0.0:
            nxt = nxt + x0_prev * f32(kf["d"])
        if kf["noise"]:
            n = noise_fn(k).to(dev).float()
            if v is not None:
                frac = (v + 1.0) / 2.0
                logvar = frac * f32(kf["lmax"]) + (1.0 - frac) * f32(kf["lmin"])
            else:
                logvar = f32(kf["lmax"]).expand_as(x)
            nxt = nxt + torch.exp(logvar * 0.5) * n
        if record is not None:
            record.append(dict(t=tt, x=x.clone(), eps=eps.clone(), out=nxt.clone()))
        if sampler == "dpm-solver++":
            x0_prev = x0
        x = nxt
    return x

