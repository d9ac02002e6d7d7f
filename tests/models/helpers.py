"""Checks shared by the head tests against mmdetection's fixtures."""

import torch


def assert_total_gradients(head, feats, losses, expected, key_map, *, atol=1e-6, rtol=1e-4):
    """d(loss_mask + loss_cls) w.r.t. the output layers and the input features, as mmdetection.

    Clears earlier gradients of ``head`` and ``feats`` first, then back-propagates the total.
    """
    head.zero_grad()
    for feat in feats:
        feat.grad = None
    (losses["loss_mask"] + losses["loss_cls"]).backward()
    params = dict(head.named_parameters())
    for mmdet_name, grad in expected["grad_params_total"].items():
        torch.testing.assert_close(params[key_map(mmdet_name)].grad, grad, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{mmdet_name}: {m}")
    for level, (feat, grad) in enumerate(zip(feats, expected["grad_feats_total"])):
        torch.testing.assert_close(feat.grad, grad, atol=atol, rtol=rtol,
                                   msg=lambda m: f"features of level {level}: {m}")
