"""Batches and outputs as models have them: positional and keyword inputs, HuggingFace-style
dict batches with "labels" and outputs with ``.logits``, ``Batches(batch_fn=, output_fn=)``.
Each form gives the same numbers as a hand-written single-tensor wrapper of the same model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import famviz as fv
from famviz import fam, oracles
from famviz import landscape as L
from famviz.batches import Batches, Inputs, describe

N, T, VOCAB, DIM, CLASSES = 12, 5, 11, 6, 3


@dataclass
class Output:
    """What a HuggingFace classifier returns (a ModelOutput with ``logits``)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class TinyClassifier(nn.Module):
    """Token ids and an attention mask in, an object with ``logits`` out: the interface of a
    HuggingFace sequence classifier (keyword forward, ``labels`` optional)."""

    def __init__(self, seed=0, dtype=torch.float64, dim=DIM):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.pre = nn.Linear(dim, dim)
        self.act = nn.ReLU()
        self.head = nn.Linear(dim, CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.to(dtype)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        keep = attention_mask[:, None, :].bool()
        h = h + F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        m = attention_mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return Output(logits=self.head(self.act(self.pre(pooled))), hidden=h)


class Packed(nn.Module):
    """The hand-written wrapper: one tensor (ids and mask stacked) in, logits out."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, X):
        return self.inner(input_ids=X[:, 0], attention_mask=X[:, 1]).logits


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[::3, -2:] = 0
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    return ids, mask, labels


IDS, MASK, LABELS = _tokens()
PACKED = (torch.stack([IDS, MASK], dim=1), LABELS)
HF_BATCHES = [{"input_ids": IDS[:7], "attention_mask": MASK[:7], "labels": LABELS[:7]},
              {"input_ids": IDS[7:], "attention_mask": MASK[7:], "labels": LABELS[7:]}]


def _pair(seed=0):
    model = TinyClassifier(seed)
    return model, Packed(model)


MEASURES = {
    "hessian_trace": lambda m, d, pre: fv.hessian_trace(m, d).value,
    "hessian_top_eigenvalue": lambda m, d, pre: fv.hessian_top_eigenvalue(m, d, seed=0).value,
    "relative_flatness": lambda m, d, pre: fv.relative_flatness(m, d, pre + "head").value,
    "relative_flatness_exact": lambda m, d, pre: fv.relative_flatness(
        m, d, pre + "pre", method="exact").value,
    "eps_sharpness": lambda m, d, pre: fv.eps_sharpness(m, d, seed=0, steps=2).value,
    "pac_bayes_flatness": lambda m, d, pre: _pac_bayes(m, d),
    "fisher_rao_norm": lambda m, d, pre: fv.fisher_rao_norm(m, d).value,
    "slice_1d": lambda m, d, pre: L.slice_1d(m, d, L.random_direction(m, seed=0), steps=3).values,
    "penalty": lambda m, d, pre: float(fam.penalty(m, d, pre + "head")),
    "oracle": lambda m, d, pre: float(oracles.dense_hessian(m, d, params=pre + "head")[0].trace()),
}


def _pac_bayes(model, data):
    """The bisection's path (its bracket), which a tiny untrained model may end without a
    finite sigma: equal paths mean equal evaluations."""
    r = fv.pac_bayes_flatness(model, data, seed=0, samples=2, steps=3)
    return torch.tensor([*r.bracket, float(r.found)])


def _same(a, b):
    if hasattr(a, "shape"):
        return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-10, atol=0,
                              equal_nan=True)
    return a == pytest.approx(b, rel=1e-10)


@pytest.mark.parametrize("name", list(MEASURES))
def test_huggingface_dict_batches_equal_the_packed_wrapper(name):
    model, packed = _pair()
    call = MEASURES[name]
    data = HF_BATCHES[:1] if name == "penalty" else HF_BATCHES
    ref_data = (PACKED[0][:7], LABELS[:7]) if name == "penalty" else PACKED
    assert _same(call(model, data, ""), call(packed, ref_data, "inner."))


def test_a_dataloader_of_dict_batches():
    model, packed = _pair()
    rows = [{"input_ids": IDS[i], "attention_mask": MASK[i], "labels": LABELS[i]}
            for i in range(N)]
    loader = DataLoader(rows, batch_size=5, shuffle=False)
    rng = torch.get_rng_state()
    assert _same(fv.hessian_trace(model, loader).value, fv.hessian_trace(packed, PACKED).value)
    assert torch.equal(torch.get_rng_state(), rng)


def test_keyword_inputs_as_X_and_outputs_as_a_dict():
    class DictOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return {"logits": self.inner(input_ids, attention_mask).logits}

    model, packed = _pair(1)
    data = ({"input_ids": IDS, "attention_mask": MASK}, LABELS)
    assert _same(fv.hessian_trace(DictOut(model), data).value,
                 fv.hessian_trace(packed, PACKED).value)


def test_positional_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(3, 5)
            self.head = nn.Linear(5, CLASSES)

        def forward(self, x1, x2):
            return self.head(torch.relu(self.a(x1) + self.b(x2)))

    class Concat(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, X):
            return self.inner(X[:, :4], X[:, 4:])

    model = TwoInputs().double()
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(N, 4, generator=g, dtype=torch.float64)
    x2 = torch.randn(N, 3, generator=g, dtype=torch.float64)
    data, ref = ((x1, x2), LABELS), (torch.cat([x1, x2], 1), LABELS)
    wrapped = Concat(model)
    for call in (lambda m, d, p: fv.hessian_trace(m, d).value,
                 lambda m, d, p: fv.relative_flatness(m, d, p + "head").value,
                 lambda m, d, p: fv.eps_sharpness(m, d, seed=1, steps=2).value,
                 lambda m, d, p: fv.reparam.max_output_change(m, m, d),
                 lambda m, d, p: float(fam.penalty(m, d, p + "head"))):
        assert _same(call(model, data, ""), call(wrapped, ref, "inner."))
    # several batches of positional inputs
    batches = [((x1[:5], x2[:5]), LABELS[:5]), ((x1[5:], x2[5:]), LABELS[5:])]
    assert _same(fv.hessian_trace(model, batches).value, fv.hessian_trace(wrapped, ref).value)


def test_batch_fn_and_output_fn():
    model, packed = _pair(2)

    class TupleOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            out = self.inner(ids, mask)
            return out.hidden, out.logits

    raw = [{"ids": IDS, "mask": MASK, "y": LABELS}]
    data = Batches(raw, batch_fn=lambda b: ((b["ids"], b["mask"]), b["y"]),
                   output_fn=lambda out: out[1])
    net = TupleOut(model)
    assert _same(fv.hessian_trace(net, data).value, fv.hessian_trace(packed, PACKED).value)
    assert _same(float(fam.penalty(net, data, "inner.head")),
                 float(fam.penalty(packed, PACKED, "inner.head")))
    with pytest.raises(TypeError, match=r"returned a tuple; .*output_fn"):
        fv.hessian_trace(net, Batches(raw, batch_fn=lambda b: ((b["ids"], b["mask"]), b["y"])))


@pytest.mark.parametrize("data, fragment", [
    ([{"input_ids": IDS}], "a dict without a 'labels' entry"),
    ([(IDS, MASK, LABELS)], "a tuple of length 3"),
    ([torch.zeros(3)], "batch 0 of data is a Tensor"),
    ([(("a", "b"), LABELS)], "not a tuple of tensors"),
])
def test_unknown_batch_forms_say_what_was_seen(data, fragment):
    with pytest.raises(TypeError, match=fragment):
        fv.hessian_trace(TinyClassifier(), data)


def test_inputs_the_model_does_not_take_are_named():
    with pytest.raises(ValueError, match=r"cannot evaluate inputs \(tokens="):
        fv.hessian_trace(TinyClassifier(), [{"tokens": IDS, "labels": LABELS}])


def test_adversarial_measures_need_one_floating_input():
    with pytest.raises(ValueError, match="needs one floating input tensor"):
        fv.average_flatness(TinyClassifier(), HF_BATCHES, adversarial=True, samples=2, seed=0)


def test_fused_attention_without_double_backward_still_gives_hvps():
    """float32 attention on the CPU picks a fused kernel with no double backward; famviz
    routes it through the math kernel, and the trace matches the dense oracle."""
    model = TinyClassifier(dtype=torch.float32, dim=32)
    data = HF_BATCHES
    r = fv.hessian_trace(model, data, params="head")
    H, _ = oracles.dense_hessian(model, data, params="head", dtype=torch.float32)
    assert r.value == pytest.approx(float(H.trace()), rel=1e-4)
    assert fv.hessian_top_eigenvalue(model, data, params="pre", seed=0).value > 0


def test_inputs_slice_move_and_describe():
    x = Inputs((IDS, 3), {"attention_mask": MASK, "flag": True})
    assert len(x) == N and len(x[:4]) == 4 and x[:4].args[1] == 3
    assert x.to(dtype=torch.float64).kwargs["attention_mask"].dtype == torch.long
    assert describe(x) == f"inputs(({N}, {T}), int, attention_mask=({N}, {T}), flag=bool)" \
        .replace("inputs(", "inputs (")
