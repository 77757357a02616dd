"""CORECT's own graph layers compute what PyTorch Geometric's RGCNConv / TransformerConv compute."""

from __future__ import annotations

import pytest
import torch

from affectkit.graph import build_graph, n_relations
from affectkit.models.graph_layers import GraphAttention, RelationalConv, dialogue_layout

pyg = pytest.importorskip("torch_geometric.nn")


def _graph(lengths: list[int], m: int, wp: int, wf: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lens = torch.tensor(lengths)
    edge_index, edge_type = build_graph(lens, m, wp, wf)
    return lens, edge_index, edge_type


def test_dialogue_layout_groups_each_dialogues_nodes():
    perm, where, sizes = dialogue_layout(torch.tensor([2, 3]), 2)
    # modality-major nodes: u0 u1 | u2 u3 u4 (m0), then the same (m1); dialogue 0 = u0, u1
    assert perm.tolist() == [0, 1, 5, 6, 2, 3, 4, 7, 8, 9] and sizes == [4, 6]
    assert torch.equal(perm[where], torch.arange(10))


@pytest.mark.parametrize("wp,wf", [(3, 2), (11, 5), (2, 0)])
def test_relational_conv_equals_rgcnconv(wp, wf):
    torch.manual_seed(0)
    lens, edge_index, edge_type = _graph([4, 9, 1, 6], 3, wp, wf)
    x = torch.randn(3 * int(lens.sum()), 8, requires_grad=True)
    ref = pyg.RGCNConv(8, 5, n_relations(3))
    ours = RelationalConv(8, 5, n_relations(3))
    ours.load_state_dict(ref.state_dict())
    a, b = ref(x, edge_index, edge_type), ours(x, edge_index, edge_type)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), x)[0]
    gb = torch.autograd.grad(b.square().sum(), x)[0]
    torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wp,wf", [(3, 2), (11, 5), (2, 0)])
def test_graph_attention_equals_transformerconv(wp, wf):
    torch.manual_seed(1)
    lens, edge_index, _ = _graph([4, 9, 1, 6], 3, wp, wf)
    x = torch.randn(3 * int(lens.sum()), 8, requires_grad=True)
    ref = pyg.TransformerConv(8, 5, heads=3, concat=True)
    ours = GraphAttention(8, 5, 3)
    ours.load_state_dict(ref.state_dict())
    a, b = ref(x, edge_index), ours(x, edge_index, lens, 3)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), x)[0]
    gb = torch.autograd.grad(b.square().sum(), x)[0]
    torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[5], [3, 5, 2]])
def test_graph_attention_node_without_incoming_edges_gets_the_skip_term(lengths):
    torch.manual_seed(2)
    lens, edge_index, _ = _graph(lengths, 2, 2, 0)
    keep = edge_index[1] % 5 >= 3  # only some nodes (of each dialogue, when several) receive anything
    edge_index = edge_index[:, keep]
    x = torch.randn(2 * sum(lengths), 4)
    ref = pyg.TransformerConv(4, 3, heads=2, concat=True)
    ours = GraphAttention(4, 3, 2)
    ours.load_state_dict(ref.state_dict())
    out = ours(x, edge_index, lens, 2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref(x, edge_index), atol=1e-5, rtol=1e-5)
    lonely = torch.ones(x.shape[0], dtype=torch.bool)
    lonely[edge_index[1]] = False
    torch.testing.assert_close(out[lonely], ours.lin_skip(x[lonely]))


def test_corect_trains_under_autocast():
    """The mixed-precision path (``train.amp`` on CUDA) has no dtype seams: CPU bf16 autocast as a stand-in."""
    from affectkit.models import build_model

    torch.manual_seed(3)
    info = {"dims": {"text": 12, "audio": 6, "visual": 5}, "n_classes": 4, "n_speakers": 2}
    model = build_model("corect", {"hidden": 8, "text_ff": 16, "text_heads": 2, "graph_heads": 2, "wp": 3, "wf": 2},
                        info)
    lens = torch.tensor([5, 3])
    mask = torch.arange(5)[None] < lens[:, None]

    class Batch:
        features = {m: torch.randn(2, 5, d) * mask[..., None] for m, d in info["dims"].items()}
        speakers = torch.randint(0, 2, (2, 5))
        lengths, labels = lens, torch.randint(0, 4, (2, 5))

    Batch.mask = mask
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(Batch)
        loss = torch.nn.functional.cross_entropy(out.float(), Batch.labels[mask])
    loss.backward()
    assert out.shape == (8, 4) and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
