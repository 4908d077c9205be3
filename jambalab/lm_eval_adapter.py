"""lm-evaluation-harness model type `jambalab`: any jambalab checkpoint (or preset) under lm_eval.

    lm_eval --model jambalab --model_args pretrained=DIR --tasks ...        (lm-eval with entry-point plugins)
    python -m jambalab.lm_eval_adapter --model jambalab --model_args pretrained=DIR --tasks ...   (any 0.4.x)

lm-eval finds external models either through the `lm_eval.models` entry-point group (releases that
load plugins) or when the module defining them has been imported. The second command imports this
module, which registers the class, then runs lm-eval's own command line; `import jambalab.lm_eval_adapter`
does the same for `lm_eval.simple_evaluate(model="jambalab", ...)`.

model_args: pretrained=DIR (a checkpoint directory, a `jambalab train` run or an ablation run) or
preset=NAME (random init, for smoke tests); batch_size, max_length (context window; longer inputs
keep their last tokens), max_gen_toks, dtype (float32 | bfloat16).

Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from jambalab.errors import InputError
from jambalab.evaluate import load_for_eval
from jambalab.tokenizer import ByteTokenizer


@register_model("jambalab")
class JambalabLM(TemplateLM):
    """loglikelihood, loglikelihood_rolling and generate_until for jambalab models (CPU or one device)."""

    backend = "causal"

    def __init__(self, pretrained: str | None = None, preset: str | None = None, batch_size: int | str = 8,
                 max_length: int = 2048, max_gen_toks: int = 256, dtype: str = "float32", device: str | None = None,
                 seed: int = 0, **_: object):
        super().__init__()
        if (pretrained is None) == (preset is None):
            raise InputError("jambalab lm-eval model: give exactly one of pretrained=DIR or preset=NAME")
        self.model, self.tokenizer, self.source = load_for_eval(pretrained, preset, seed=int(seed))
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise InputError(f"jambalab lm-eval model: dtype must be one of {list(dtypes)}, got {dtype!r}")
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval passes its default "cuda" even where there is none
        self.model.to(device=device, dtype=dtypes[dtype])
        self._device = torch.device(device)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokenization -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return self.model.config.eos_token_id if eos is None else eos

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return "bytes" if isinstance(self.tokenizer, ByteTokenizer) else self.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- scoring ------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is greedy) for (context, continuation) ids.

        The input is context + continuation minus its last token, cut to the last max_length tokens;
        same-length inputs with same-length continuations run as one batch."""
        inputs = []
        for ctx, cont in pairs:
            if not cont:
                raise InputError("lm-eval asked to score an empty continuation")
            inputs.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i][0]), len(inputs[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(inputs)
        i = 0
        while i < len(order):
            shape = (len(inputs[order[i]][0]), len(inputs[order[i]][1]))
            group = [order[i]]
            while (i + len(group) < len(order) and len(group) < self.batch_size
                   and (len(inputs[order[i + len(group)]][0]), len(inputs[order[i + len(group)]][1])) == shape):
                group.append(order[i + len(group)])
            n_cont = shape[1]
            x = torch.tensor([inputs[j][0] for j in group], device=self._device)  # (b, L)
            logp = F.log_softmax(self.model(x, logits_to_keep=n_cont).logits.float(), dim=-1)  # (b, n_cont, V)
            target = torch.tensor([inputs[j][1] for j in group], device=self._device)  # (b, n_cont)
            picked = logp.gather(-1, target[..., None])[..., 0].sum(-1)  # (b,)
            greedy = (logp.argmax(-1) == target).all(-1)  # (b,)
            for k, j in enumerate(group):
                out[j] = (float(picked[k]), bool(greedy[k]))
            i += len(group)
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        from jambalab.generate import generate

        results = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            out = generate(self.model, torch.tensor(ids, device=self._device), max_new,
                           do_sample=do_sample and temperature > 0, temperature=temperature or 1.0,
                           eos_token_id=self.eot_token_id, stop_strings=until or None, tokenizer=self.tokenizer)
            text = self.tok_decode(out[len(ids):].tolist())
            for stop in until:  # cut at the first stop string, as lm-eval's own models do
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `jambalab` model type registered (for lm-eval without plugins)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
