# %% [markdown]
# # An SAE in a language model: reconstruction, top latents, steering
#
# A notebook-style script (the `# %%` cells open as a notebook in VS Code, or in Jupyter with jupytext; or
# run it whole: `python examples/sae_walkthrough.py --sae runs/x/sae`). It
#
# 1. loads an exported SAE (`sae_dist.load_sae`) and the LM it was trained on (its `cfg.json` names the
#    model and the hook point);
# 2. splices the SAE into the model at that hook and compares the next-token loss on a prompt with and
#    without it;
# 3. lists the latents that fire most on each token of the prompt, with their `sae-browse` page;
# 4. steers generation by adding one latent's decoder direction to the hook's activation.

# %%
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sae_dist
from sae_dist.harvest import bos_token_id, load_lm, run_to_hook, splice_hook, tokenize_document
from sae_dist.harvest.lm import EMBEDDED_MODEL_NAME


def load(sae_dir: str | Path, model: str | None = None):
    """(sae, model, tokenizer, hook name): the SAE at `sae_dir` and its LM (`model` overrides cfg.json's
    model_name, e.g. a local directory; the embedded default LM's name loads the embedded GGUF)."""
    sae = sae_dist.load_sae(sae_dir)
    name = model or sae.cfg["model_name"]
    lm, tok = load_lm("embedded" if name == EMBEDDED_MODEL_NAME else name)
    return sae, lm, tok, sae.cfg["hook_name"]


def prompt_ids(tok, prompt: str) -> torch.Tensor:
    """int64 [1, T]: BOS (`bos_token_id`: the tokenizer's BOS, else its EOS) then the prompt's tokens
    (`tokenize_document`), as the harvester packs text."""
    return torch.tensor([[bos_token_id(tok), *tokenize_document(prompt, tok)]])


@torch.no_grad()
def hook_acts(lm, hook: str, ids: torch.Tensor) -> torch.Tensor:
    """float32 [T - 1, d_in]: the hook's activations at positions 1.. of `ids` [1, T] (BOS, position 0, is
    left out, as the SAE was trained)."""
    return run_to_hook(lm, hook, ids)[0, 1:].float()


# %% [markdown]
# ## 1. The SAE spliced in: next-token loss with the reconstruction in place of the activation


# %%
@torch.no_grad()
def spliced_loss(lm, sae, hook: str, ids: torch.Tensor) -> tuple[float, float]:
    """(clean loss, loss with the hook's activation replaced by the SAE's reconstruction), nats per token
    over positions 1.. (Gao et al. 2024, sec. 4.1's downstream loss)."""
    clean = float(lm(ids, labels=ids).loss)
    with splice_hook(lm, hook, lambda a: sae(a.float()).to(a.dtype)):
        spliced = float(lm(ids, labels=ids).loss)
    return clean, spliced


# %% [markdown]
# ## 2. The latents that fire most on each token


# %%
@torch.no_grad()
def top_latents(sae, acts: torch.Tensor, n: int = 3) -> list[list[tuple[int, float]]]:
    """For each row of `acts` [T - 1, d_in] (`hook_acts`): the `n` latents with the largest activations,
    [(latent, value)] (only latents that fire; a row may be empty)."""
    z = sae.encode(acts)
    vals, idx = z.topk(min(n, z.shape[-1]), dim=-1)
    return [[(int(i), float(v)) for v, i in zip(vr, ir, strict=True) if v > 0]
            for vr, ir in zip(vals, idx, strict=True)]


def browser_page(browser: Path | None, latent: int) -> str:
    """The latent's `sae-browse` page, when the browser directory has one."""
    page = browser / "latents" / f"{latent}.html" if browser else None
    return str(page) if page is not None and page.is_file() else ""


# %% [markdown]
# ## 3. Steering: add a latent's decoder direction during generation


# %%
@torch.no_grad()
def generate(lm, tok, ids: torch.Tensor, max_new_tokens: int, hook: str | None = None,
             direction: torch.Tensor | None = None, alpha: float = 0.0) -> list[int]:
    """Greedy continuation of `ids` (token ids); with `direction`, alpha * direction is added to the hook's
    activation at every position of every forward."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    if direction is None:
        return lm.generate(ids, **kw)[0, ids.shape[1]:].tolist()
    with splice_hook(lm, hook, lambda a: a + alpha * direction.to(a.dtype)):
        return lm.generate(ids, **kw)[0, ids.shape[1]:].tolist()


@torch.no_grad()
def next_token_logits(lm, ids: torch.Tensor, hook: str | None = None, direction: torch.Tensor | None = None,
                      alpha: float = 0.0) -> torch.Tensor:
    """float32 [vocab]: the LM's logits for the token after `ids`, with the same steering as `generate`."""
    if direction is None:
        return lm(ids).logits[0, -1].float()
    with splice_hook(lm, hook, lambda a: a + alpha * direction.to(a.dtype)):
        return lm(ids).logits[0, -1].float()


# %%
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="An exported SAE in its LM: splice, top latents, steering")
    p.add_argument("--sae", required=True, help="an exported SAE directory (e.g. runs/x/sae)")
    p.add_argument("--model", default=None, help="the LM (default: the SAE's cfg.json model_name)")
    p.add_argument("--prompt", default="def add(a, b):\n    return a + b\n")
    p.add_argument("--browser", default=None, help="a sae-browse output directory (default: <sae>/../browser)")
    p.add_argument("--latent", type=int, default=None, help="latent to steer with (default: the prompt's top one)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="steering strength, in units of the prompt's mean activation norm at the hook")
    p.add_argument("--max-new-tokens", type=int, default=20)
    args = p.parse_args(argv)

    sae, lm, tok, hook = load(args.sae, args.model)
    ids = prompt_ids(tok, args.prompt)
    if ids.shape[1] < 2:
        p.error(f"--prompt={args.prompt!r} gives no token; give some text")
    clean, spliced = spliced_loss(lm, sae, hook, ids)
    print(f"hook {hook}: next-token loss {clean:.4f} clean, {spliced:.4f} with the SAE spliced in")
    browser = Path(args.browser) if args.browser else Path(args.sae).parent / "browser"
    acts = hook_acts(lm, hook, ids)
    tops = top_latents(sae, acts)
    for t, row in zip(ids[0, 1:].tolist(), tops, strict=True):
        cells = ", ".join(f"{i} ({v:.2f}{' ' + browser_page(browser, i) if browser_page(browser, i) else ''})"
                          for i, v in row)
        print(f"{tok.decode([t])!r:>14}  {cells}")
    fired = [(v, i) for row in tops for i, v in row]
    if args.latent is None and not fired:
        print("no latent fires on the prompt: pass --latent N to steer with latent N, or a longer --prompt")
        return
    latent = args.latent if args.latent is not None else max(fired)[1]
    direction = sae.W_dec[latent] / sae.W_dec[latent].norm()
    alpha = args.alpha * float(acts.norm(dim=-1).mean())
    plain = generate(lm, tok, ids, args.max_new_tokens)
    steered = generate(lm, tok, ids, args.max_new_tokens, hook, direction, alpha)
    shift = (next_token_logits(lm, ids, hook, direction, alpha).log_softmax(-1)
             - next_token_logits(lm, ids).log_softmax(-1))
    print("steering raises the next-token log-probabilities of " + ", ".join(
        f"{tok.decode([int(i)])!r} (+{float(shift[i]):.2f})" for i in shift.topk(5).indices))
    print(f"generation:           {tok.decode(plain)!r}")
    print(f"steered (+{alpha:.1f} x latent {latent}'s direction): {tok.decode(steered)!r}")


if __name__ == "__main__":
    main()
