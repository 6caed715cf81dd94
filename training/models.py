"""The three networks, written from the DiffiT paper's description (as src/model/ implements it):

* DiffiT: isotropic ViT with time-dependent self-attention (TMSA); parameter names are the
  official checkpoint's (`x_embedder.proj`, `blocks.i.attn.qkv_temb`, ...).
* AutoencoderKL: diffusers key layout (`encoder.*`, `quant_conv`, `post_quant_conv`,
  `decoder.*`), GroupNorm eps 1e-6, nearest-2x upsampling then a 3x3 conv.
* Classifier: a small CNN used only to score samples (accuracy and Frechet distance).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# DiffiT
# --------------------------------------------------------------------------------------------

LN_EPS = 1e-6
FREQ_DIM = 256


def sincos_pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos position table [grid*grid, dim] (float64 math): channels [0:dim/2]
    encode the token's column, [dim/2:dim] its row; each half is [sin(p w_k), cos(p w_k)],
    w_k = 10000^(-k/(dim/4))."""
    assert dim % 4 == 0
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def half(pos):
        arg = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)

    return np.concatenate([half(cols), half(rows)], axis=1).astype(np.float32)


def relative_position_index(grid):
    """index(a, b) = (r_a - r_b + W - 1)(2W - 1) + (c_a - c_b + W - 1), as int64 [N, N]."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    dr = r[:, None] - r[None, :] + grid - 1
    dc = c[:, None] - c[None, :] + grid - 1
    return (dr * (2 * grid - 1) + dc).long()


def timestep_features(t):
    """[cos(t f_k), sin(t f_k)] with f_k = exp(-ln(10000) k / 128), float32 (cos first)."""
    half = FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)


class PatchEmbed(nn.Module):
    def __init__(self, in_ch, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], tokens row-major


class TimestepEmbedder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_features(t))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: null class

    def forward(self, y):
        return self.embedding_table(y)


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention with a relative-position bias."""

    def __init__(self, dim, heads, grid):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_temb = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(grid))

    def bias(self):
        n = self.relative_position_index.shape[0]
        b = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return b.reshape(n, n, self.heads).permute(2, 0, 1)  # [heads, N, N]

    def forward(self, h, c):
        b, n, d = h.shape
        qkv = self.qkv(h) + self.qkv_temb(c)[:, None, :]
        qkv = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, d_head]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias()[None].to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim, heads, grid, mlp_ratio):
        super().__init__()
        self.attn = TMSA(dim, heads, grid)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, c, trace=None):
        a = self.attn(layer_norm(x), c)
        x = x + a
        m = self.mlp(layer_norm(x))
        x = x + m
        if trace is not None:
            trace.update(attn=a, mlp=m, out=x)
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_ch):
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * out_ch)

    def forward(self, x):
        return self.linear(F.silu(layer_norm(x)))


class DiffiT(nn.Module):
    def __init__(self, input_size=8, patch_size=1, in_channels=4, hidden_size=192, depth=8,
                 num_heads=4, mlp_ratio=4.0, num_classes=10, learn_sigma=True, class_dropout_prob=0.1):
        super().__init__()
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                           num_classes=num_classes, learn_sigma=learn_sigma)
        self.patch = patch_size
        self.grid = input_size // patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden_size, self.grid))[None])
        self.blocks = nn.ModuleList(
            [Block(hidden_size, num_heads, self.grid, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:
            nn.init.trunc_normal_(blk.attn.relative_position_bias_table, std=0.02)
            # The conditioning path starts small so that early training sees a plain ViT.
            nn.init.normal_(blk.attn.qkv_temb.weight, std=0.02)
        # Zero output: the first prediction is eps = 0, v = 0 (the geometric-mean variance).
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, tokens):
        b, g, p, oc = tokens.shape[0], self.grid, self.patch, self.out_channels
        x = tokens.reshape(b, g, g, p, p, oc)  # token (gh, gw) holds (p, q, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, oc, g * p, g * p)

    def forward(self, x, t, y, trace=None):
        h = self.x_embedder(x)
        if trace is not None:
            trace["x_embedder"] = h
        h = h + self.pos_embed
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y)
        c = t_emb + y_emb
        if trace is not None:
            trace.update(x_plus_pos=h, t_freq=timestep_features(t), t_embedder=t_emb,
                         y_embedder=y_emb, c=c)
        for i, blk in enumerate(self.blocks):
            bt = {} if trace is not None else None
            h = blk(h, c, bt)
            if trace is not None:
                trace[f"blocks.{i}.attn"], trace[f"blocks.{i}.mlp"], trace[f"blocks.{i}"] = bt["attn"], bt["mlp"], bt["out"]
        out = self.final_layer(h)
        if trace is not None:
            trace["final_layer"] = out
        return self.unpatchify(out)

    def num_trainable(self):
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# AutoencoderKL (diffusers layout)
# --------------------------------------------------------------------------------------------

VAE_EPS = 1e-6


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=VAE_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=VAE_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=VAE_EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        b, c, h, w = x.shape
        tok = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = self.to_q(tok), self.to_k(tok), self.to_v(tok)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        out = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)
        return out + x


class MidBlock(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, down):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if down else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, up):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers + 1)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if up else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, in_ch, chans, layers, groups, latent):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, chans[0], 3, padding=1)
        blocks, prev = [], chans[0]
        for i, c in enumerate(chans):
            blocks.append(DownBlock(prev, c, layers, groups, down=i + 1 < len(chans)))
            prev = c
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=VAE_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, out_ch, chans, layers, groups, latent):
        super().__init__()
        rev = list(reversed(chans))
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        blocks, prev = [], rev[0]
        for i, c in enumerate(rev):
            blocks.append(UpBlock(prev, c, layers, groups, up=i + 1 < len(rev)))
            prev = c
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=VAE_EPS)
        self.conv_out = nn.Conv2d(rev[-1], out_ch, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                 layers_per_block=1, latent_channels=4, norm_num_groups=16, scaling_factor=1.0):
        super().__init__()
        self.scaling_factor = scaling_factor
        self.cfg = dict(in_channels=in_channels, out_channels=out_channels,
                        block_out_channels=list(block_out_channels),
                        layers_per_block=layers_per_block, latent_channels=latent_channels,
                        norm_num_groups=norm_num_groups)
        self.encoder = Encoder(in_channels, block_out_channels, layers_per_block, norm_num_groups, latent_channels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(out_channels, block_out_channels, layers_per_block, norm_num_groups, latent_channels)

    def encode(self, x):
        """Posterior mean and log-variance."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Decodes an *unscaled* latent (what diffusers' `decode` takes)."""
        return self.decoder(self.post_quant_conv(z))

    def config_json(self):
        n = len(self.cfg["block_out_channels"])
        return dict(self.cfg, _class_name="AutoencoderKL", act_fn="silu", sample_size=32,
                    down_block_types=["DownEncoderBlock2D"] * n,
                    up_block_types=["UpDecoderBlock2D"] * n,
                    scaling_factor=self.scaling_factor)


# --------------------------------------------------------------------------------------------
# Classifier (evaluation only)
# --------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    FEATURES = 128

    def __init__(self, num_classes=10):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(1, 32), *stage(32, 64), *stage(64, 128))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, self.FEATURES),
                                   nn.BatchNorm1d(self.FEATURES), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.FEATURES, num_classes)

    def penultimate(self, x):
        return self.embed(self.features(x))

    def forward(self, x):
        return self.head(self.dropout(self.penultimate(x)))
