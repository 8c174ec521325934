"""Compile signatures of the ``lora_mul`` kernels: one :class:`CompileSpec` per kernel, config and
dtype that launches run (``python -m pace_kernels.compile_check``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from .._triton_utils import NOISE_GATHER, NOISE_NONE, NOISE_SAMPLE, configs_for_arch
from ..lora_mul.configs import (
    DM_CONFIGS_16,
    DM_CONFIGS_32,
    PLAIN_CONFIGS_16,
    PLAIN_CONFIGS_32,
    SAMPLE_CONFIGS_16,
    SAMPLE_CONFIGS_32,
    TWO_GEMM_DX_CONFIGS_16,
    TWO_GEMM_DX_CONFIGS_32,
    TWO_GEMM_FACTORS_DX_CONFIGS_16,
    TWO_GEMM_FACTORS_DX_CONFIGS_32,
    TWO_GEMM_FACTORS_FWD_CONFIGS_16,
    TWO_GEMM_FACTORS_FWD_CONFIGS_32,
    TWO_GEMM_FWD_CONFIGS_16,
    TWO_GEMM_FWD_CONFIGS_32,
)
from ..lora_mul.kernels import (
    _lora_mul_dm_kernel,
    _lora_mul_dx_kernel,
    _lora_mul_dx_two_gemm_kernel,
    _lora_mul_fwd_kernel,
    _lora_mul_fwd_two_gemm_kernel,
)
from .machinery import DOT_VARIANTS, TRITON_DTYPE_NAMES, CompileSpec, config_label


def _spec(name: str, fn, sig: dict, consts: dict, cfg: triton.Config, dtype: torch.dtype,
          divisible: Sequence[str]) -> CompileSpec:
    consts = dict(cfg.kwargs, **consts)
    return CompileSpec(name, fn, sig, consts, cfg.num_warps, cfg.num_stages, dtype,
                       note=config_label(consts, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), cfg.num_warps,
                                         cfg.num_stages),
                       divisible=tuple(divisible))


def compile_specs(arch: int = 90) -> list[CompileSpec]:
    """Every kernel in every config ``sm_<arch>`` runs, at the worst-case constexprs (bias, delta bias
    and noise on; padded rank 16 and 64 where the rank enters) and the dtypes each list serves;
    fp32 rows for both dot precisions (tf32, tf32x3)."""
    specs: list[CompileSpec] = []
    for dtype, precision in DOT_VARIANTS:
        t = TRITON_DTYPE_NAMES[dtype]
        fp32 = dtype == torch.float32
        common = dict(UPCAST=False, PRECISION=precision)
        fwd_sig = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}", z_ptr="*fp32",
                       bias_ptr=f"*{t}", db_ptr=f"*{t}", y_ptr=f"*{t}", D="i32", K="i32", RANK="i32",
                       n_seg="i32", seg_len="i32", seg_rows="i32", stride_xm="i32", stride_wd="i32",
                       stride_ar="i32", stride_bd="i32", stride_zs="i32", stride_ym="i32")
        fwd_div = ("D", "K", "stride_xm", "stride_wd", "stride_ar", "stride_zs", "stride_ym")
        dx_sig = dict(g_ptr=f"*{t}", w_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}", z_ptr="*fp32",
                      dx_ptr=f"*{t}", D="i32", K="i32", RANK="i32", n_seg="i32", seg_len="i32",
                      seg_rows="i32", stride_gm="i32", stride_wd="i32", stride_ar="i32", stride_bd="i32",
                      stride_zs="i32", stride_dxm="i32")
        dx_div = ("D", "K", "stride_gm", "stride_wd", "stride_ar", "stride_zs", "stride_dxm")
        rows_args = dict(D="i32", K="i32", n_rows="i32", row_chunk="i32", row_stride="i32", row_off="i32",
                         rows_per_z="i32")
        for cfg in configs_for_arch(PLAIN_CONFIGS_32 if fp32 else PLAIN_CONFIGS_16, arch):
            specs.append(_spec("lora_mul_fwd noise-free", _lora_mul_fwd_kernel, fwd_sig,
                               dict(NOISE=NOISE_NONE.value, HAS_BIAS=True, HAS_DB=True, R=16, **common), cfg,
                               dtype, fwd_div))
            specs.append(_spec("lora_mul_dx noise-free", _lora_mul_dx_kernel, dx_sig,
                               dict(NOISE=NOISE_NONE.value, R=16, **common), cfg, dtype, dx_div))
        for by_arch in (SAMPLE_CONFIGS_32 if fp32 else SAMPLE_CONFIGS_16).values():
            for cfg in configs_for_arch(by_arch, arch):
                for r in (16, 64):
                    specs.append(_spec(f"lora_mul_fwd per-sample r{r}", _lora_mul_fwd_kernel, fwd_sig,
                                       dict(NOISE=NOISE_SAMPLE.value, HAS_BIAS=True, HAS_DB=True, R=r,
                                            **common), cfg, dtype, fwd_div))
                    specs.append(_spec(f"lora_mul_dx per-sample r{r}", _lora_mul_dx_kernel, dx_sig,
                                       dict(NOISE=NOISE_SAMPLE.value, R=r, **common), cfg, dtype, dx_div))
        # The two-GEMM kernels read a W0*M buffer or build it from the factors (the launcher's
        # choice by row count; each has its config lists), the build at padded rank 16 and 64.
        fwd_lists = {False: TWO_GEMM_FWD_CONFIGS_32 if fp32 else TWO_GEMM_FWD_CONFIGS_16,
                     True: TWO_GEMM_FACTORS_FWD_CONFIGS_32 if fp32 else TWO_GEMM_FACTORS_FWD_CONFIGS_16}
        dx_lists = {False: TWO_GEMM_DX_CONFIGS_32 if fp32 else TWO_GEMM_DX_CONFIGS_16,
                    True: TWO_GEMM_FACTORS_DX_CONFIGS_32 if fp32 else TWO_GEMM_FACTORS_DX_CONFIGS_16}
        two_fwd_sig = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", wm_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}",
                           z_ptr="*fp32", bias_ptr=f"*{t}", db_ptr=f"*{t}", y_ptr=f"*{t}", RANK="i32",
                           **rows_args, stride_xm="i32", stride_wd="i32", stride_ar="i32", stride_bd="i32",
                           stride_zr="i32", stride_ym="i32")
        two_dx_sig = dict(g_ptr=f"*{t}", w_ptr=f"*{t}", wm_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}",
                          z_ptr="*fp32", dx_ptr=f"*{t}", RANK="i32", **rows_args, stride_gm="i32",
                          stride_wd="i32", stride_ar="i32", stride_bd="i32", stride_zr="i32",
                          stride_dxm="i32")
        two_fwd_div = ("D", "K", "stride_xm", "stride_wd", "stride_ar", "stride_zr", "stride_ym")
        two_dx_div = ("D", "K", "stride_gm", "stride_wd", "stride_ar", "stride_zr", "stride_dxm")
        # (Row names: "lora_mul_dx two-GEMM" is the buffer kernel alone, as `--only` matches substrings.)
        modes = ((False, 16, "two-GEMM"), (True, 16, "factors two-GEMM r16"),
                 (True, 64, "factors two-GEMM r64"))
        for factors, r, label in modes:
            for cfg in configs_for_arch(fwd_lists[factors], arch):
                specs.append(_spec(f"lora_mul_fwd {label}", _lora_mul_fwd_two_gemm_kernel,
                                   two_fwd_sig,
                                   dict(HAS_BIAS=True, HAS_DB=True, FACTORS=factors, R=r, **common),
                                   cfg, dtype, two_fwd_div))
            for cfg in configs_for_arch(dx_lists[factors], arch):
                specs.append(_spec(f"lora_mul_dx {label}", _lora_mul_dx_two_gemm_kernel, two_dx_sig,
                                   dict(FACTORS=factors, R=r, **common), cfg, dtype, two_dx_div))
        for cfg in configs_for_arch(DM_CONFIGS_32 if fp32 else DM_CONFIGS_16, arch):
            sig = dict(g_ptr=f"*{t}", x_ptr=f"*{t}", z_ptr="*fp32", w_ptr=f"*{t}", dm_ptr="*fp32",
                       ddb_ptr="*fp32", N="i32", D="i32", K="i32", rows_per_z="i32", rows_per_split="i32",
                       stride_gm="i32", stride_xm="i32", stride_zr="i32", stride_wd="i32",
                       stride_dms="i32", stride_dmd="i32", stride_ddbs="i32")
            for scale_w in (True, False):
                consts = dict(NOISE=NOISE_GATHER.value, HAS_DB=True, SCALE_W=scale_w, **common)
                # one split: rows_per_split = N, any value; several: multiples of 128 rows
                divisible = ("D", "K", "stride_gm", "stride_xm", "stride_zr", "stride_wd", "stride_dms",
                             "stride_dmd", "stride_ddbs") + (() if scale_w else ("rows_per_split",))
                specs.append(_spec("lora_mul_dm" + ("" if scale_w else " split"), _lora_mul_dm_kernel, sig,
                                   consts, cfg, dtype, divisible))
    return specs
