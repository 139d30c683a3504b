"""backbone.freeze=true: a linear probe trains the head only and never changes the backbone."""

import torch

from transfer.backbone import BackboneConfig, build_backbone
from transfer.optim import OptimConfig, build_optimizer


def test_frozen_backbone_stays_fixed_and_in_eval_mode() -> None:
    cfg = BackboneConfig(spec="random:vit_micro", prompt="learned", drop_path_rate=0.5, freeze=True)
    backbone = build_backbone(cfg, (64, 32))
    head = torch.nn.Linear(backbone.num_features, 3)
    model = torch.nn.Sequential(backbone, head)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    head_before = head.weight.detach().clone()
    optimizer, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.5), steps_per_epoch=1, epochs=1)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained and all(id(p) not in trained for p in backbone.model.parameters())

    model.train()
    assert not backbone.model.training  # drop path off: identical features on repeated calls
    x = torch.randn(4, 3, 64, 32)
    assert torch.equal(backbone(x), backbone(x))
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head.weight, head_before)  # the head did train


def test_unfrozen_backbone_trains() -> None:
    backbone = build_backbone(BackboneConfig(spec="random:vit_micro", freeze=False), (64, 32))
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 2))
    optimizer, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.5), steps_per_epoch=1, epochs=1)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in backbone.model.parameters())
