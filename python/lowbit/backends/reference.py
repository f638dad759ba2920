"""The pure-PyTorch reference as a backend (any device; computes on the CPU)."""
from .. import reference as ref


def quantize_blockwise(x, code, mids, block_size, stochastic, seed, offset, codes, absmax):
    c, a = ref.quantize_blockwise(x.cpu(), code.cpu(), block_size, stochastic, seed, offset)
    codes.copy_(c.reshape(codes.shape))
    absmax.copy_(a)


def dequantize_blockwise(codes, absmax, code, block_size, n, out):
    out.copy_(ref.dequantize_blockwise(codes.cpu(), absmax.cpu(), code.cpu(), block_size,
                                       out.shape, out.dtype))


def stochastic_round(x, out, seed, offset):
    out.copy_(ref.stochastic_round(x.cpu(), out.dtype, seed, offset))


def adam_step(params, grads, m, m_absmax, v, v_absmax, state_bits, scalars, maximize):
    from ..reference import optim
    keys = ("decay", "wd", "a1", "b2", "a2", "bc2", "eps", "step_size")
    sc = dict(zip(keys, scalars))
    for i, (p, g) in enumerate(zip(params, grads)):
        if state_bits == 32:
            state = {"exp_avg": m[i], "exp_avg_sq": v[i]}
        else:
            state = {"exp_avg_codes": m[i], "exp_avg_absmax": m_absmax[i],
                     "exp_avg_sq_codes": v[i], "exp_avg_sq_absmax": v_absmax[i]}
        mm, vv = optim.load_moments(state, p, state_bits)
        p_new, m_new, v_new = optim.adam_update(p, g, mm, vv, sc, maximize)
        optim.store_moments(state, m_new.reshape(-1) if state_bits != 32 else m_new,
                            v_new.reshape(-1) if state_bits != 32 else v_new, state_bits)
        p.copy_(p_new)
        if state_bits == 32:
            m[i].copy_(state["exp_avg"])
            v[i].copy_(state["exp_avg_sq"])
        else:
            for dst, key in ((m[i], "exp_avg_codes"), (m_absmax[i], "exp_avg_absmax"),
                             (v[i], "exp_avg_sq_codes"), (v_absmax[i], "exp_avg_sq_absmax")):
                dst.copy_(state[key])
