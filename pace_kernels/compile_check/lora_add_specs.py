"""Compile signatures of the ``lora_add`` kernels: one :class:`CompileSpec` per kernel, config,
dtype and noise path that launches run (``python -m pace_kernels.compile_check``)."""

from __future__ import annotations

import itertools

import torch

from .._triton_utils import NOISE_GATHER, NOISE_SEGMENTS, configs_for_arch
from ..lora_add.configs import (
    _DX_NAMES,
    _RG_NAMES,
    DX_CONFIGS_16,
    DX_CONFIGS_32,
    FWD_CONFIGS_16,
    FWD_CONFIGS_32,
    RANK_GRAD_CONFIGS_16,
    RANK_GRAD_CONFIGS_32,
)
from ..lora_add.kernels import _bwd_dx_kernel, _fwd_kernel, _rank_grad_kernel
from .machinery import DOT_VARIANTS, TRITON_DTYPE_NAMES, CompileSpec, config_label

_NOISE_NAMES = {NOISE_GATHER.value: "gather", NOISE_SEGMENTS.value: "segments"}


def compile_specs(arch: int = 90) -> list[CompileSpec]:
    """Every kernel in every config ``sm_<arch>`` runs, at the worst-case constexprs (bias, delta bias
    and noise on, both noise paths), at rank 16 and 64 (the smallest and largest padded rank), for
    each dtype its list serves; fp32 rows for both dot precisions (tf32, tf32x3)."""
    specs: list[CompileSpec] = []
    common = dict(N="i32", D="i32", K="i32", RANK="i32", rows_per_noise="i32")
    for dtype, precision in DOT_VARIANTS:
        t = TRITON_DTYPE_NAMES[dtype]
        fp32 = dtype == torch.float32
        suffix = f" {precision}" if fp32 else ""
        for r in (16, 64):
            fwd_configs = configs_for_arch(FWD_CONFIGS_32 if fp32 else FWD_CONFIGS_16, arch)
            modes = ((NOISE_GATHER.value, False), (NOISE_SEGMENTS.value, True))
            for cfg, (noise, fold) in itertools.product(fwd_configs, modes):
                consts = dict(cfg.kwargs, HAS_BIAS=True, HAS_DB=True, FOLD_DB=fold, NOISE=noise, R=r,
                              UPCAST=False, PRECISION=precision)
                sig = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", bias_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}",
                           db_ptr=f"*{t}", z_ptr="*fp32", y_ptr=f"*{t}", u_ptr=f"*{t}", **common,
                           stride_xm="i32", stride_wd="i32", stride_ar="i32", stride_bd="i32",
                           stride_zm="i32", stride_ym="i32", stride_um="i32")
                specs.append(CompileSpec(
                    f"lora_add_fwd {_NOISE_NAMES[noise]} r{r}{suffix}", _fwd_kernel, sig, consts,
                    cfg.num_warps, cfg.num_stages, dtype,
                    note=config_label(consts, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), cfg.num_warps,
                                      cfg.num_stages),
                    divisible=("D", "K", "stride_xm", "stride_wd", "stride_ar", "stride_zm", "stride_ym")))
            dx_configs = configs_for_arch(DX_CONFIGS_32 if fp32 else DX_CONFIGS_16, arch)
            for cfg, noise in itertools.product(dx_configs, (NOISE_GATHER.value, NOISE_SEGMENTS.value)):
                consts = dict(cfg.kwargs, NOISE=noise, COMPUTE_DX=True, R=r, UPCAST=False,
                              PRECISION=precision)
                sig = dict(g_ptr=f"*{t}", w_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}", z_ptr="*fp32",
                           dx_ptr=f"*{t}", p_ptr=f"*{t}", **common,
                           stride_gm="i32", stride_wd="i32", stride_ar="i32", stride_bd="i32",
                           stride_zm="i32", stride_dxm="i32", stride_pm="i32")
                specs.append(CompileSpec(
                    f"lora_add_bwd_dx {_NOISE_NAMES[noise]} r{r}{suffix}", _bwd_dx_kernel, sig, consts,
                    cfg.num_warps, cfg.num_stages,
                    dtype, note=config_label(consts, _DX_NAMES, cfg.num_warps, cfg.num_stages),
                    divisible=("D", "K", "stride_gm", "stride_wd", "stride_ar", "stride_zm", "stride_dxm")))
            for cfg in configs_for_arch(RANK_GRAD_CONFIGS_32 if fp32 else RANK_GRAD_CONFIGS_16, arch):
                consts = dict(cfg.kwargs, NOISE=NOISE_GATHER.value, HAS_COLSUM=True, R=r, UPCAST=False,
                              PRECISION=precision)
                sig = dict(l_ptr=f"*{t}", z_ptr="*fp32", r_ptr=f"*{t}", out_ptr="*fp32", colsum_ptr="*fp32",
                           N="i32", F="i32", RANK="i32", rows_per_noise="i32", rows_per_split="i32",
                           stride_lm="i32", stride_zm="i32", stride_rm="i32", stride_os="i32",
                           stride_of="i32", stride_cs="i32")
                specs.append(CompileSpec(
                    f"lora_add_rank_grad r{r}{suffix}", _rank_grad_kernel, sig, consts, cfg.num_warps,
                    cfg.num_stages, dtype,
                    note=config_label(consts, _RG_NAMES, cfg.num_warps, cfg.num_stages),
                    divisible=("F", "stride_lm", "stride_zm", "stride_os", "stride_of", "stride_cs")))
    return specs
