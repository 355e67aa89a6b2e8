"""Which op breaks batch invariance? One full forward of a probe row alone vs inside a padded batch, every
leaf module's output (and attn_out's input: the attention) compared bit for bit on the probe's real tokens,
with the batch-invariant mode off and on. GPU diagnostic for issue 17 item 8."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batch_invariance as bi  # noqa: E402
from engine_path import construct  # noqa: E402

from dlc.runtime.batch_invariant import batch_invariant_mode  # noqa: E402


def record(model, ids, key_mask, n_real):
    outs, hooks = {}, []
    for name, mod in model.named_modules():
        if len(list(mod.children())) == 0:
            def post(m, a, o, name=name):
                if isinstance(o, torch.Tensor) and o.dim() >= 2:
                    outs.setdefault(name, o[0, :n_real].detach().clone())
            hooks.append(mod.register_forward_hook(post))
            if name.endswith("attn_out") or name.endswith("o_proj") or name.endswith("dense"):
                def pre(m, a, name=name):
                    outs.setdefault(name + ".<in>", a[0][0, :n_real].detach().clone())
                hooks.append(mod.register_forward_pre_hook(pre))
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        h = model(ids, pos, key_mask)
    for hk in hooks:
        hk.remove()
    outs["final"] = h[0, :n_real].clone()
    return outs


def main():
    tiny = "--tiny" in sys.argv                        # CPU smoke run of the script itself
    dev = "cpu" if tiny else "cuda"
    model = construct(bi.model_config(tiny), dev, torch.float32 if tiny else torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lens = [40, 60, 25, 50]
    W = max(lens)
    ids = torch.randint(3, 90, (len(lens), W), generator=g).to(dev)
    km = torch.arange(W, device=dev)[None] < torch.tensor(lens, device=dev)[:, None]
    for on in ((False,) if tiny else (False, True)):
        with batch_invariant_mode(on):
            solo = record(model, ids[:1, :lens[0]], km[:1, :lens[0]], lens[0])
            mixed = record(model, ids, km, lens[0])
        bad = [(n, (solo[n].float() - mixed[n].float()).abs().max().item()) for n in solo
               if n in mixed and not torch.equal(solo[n], mixed[n])]
        print(f"mode {'on' if on else 'off'}: {len(bad)} of {len(solo)} outputs differ; first: {bad[:6]}",
              flush=True)


if __name__ == "__main__":
    main()
