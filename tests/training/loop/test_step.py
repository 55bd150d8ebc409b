"""Tests of training.loop.step.TrainingStep: one optimizer step of EDM2 training."""

import torch

from tests.tiny import make_tiny_precond
from training.encoders import StandardRGBEncoder
from training.loop import step as train_step
from training.training_loop import EDM2Loss

LR_KWARGS = dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=0.01, ref_batches=0, rampup_Mimg=0)


def _one_step(batch_gpu: int, images: torch.Tensor, max_grad_norm: float = 0) -> tuple:
    """(finite, weights after the step) of a tiny network trained on `images` in rounds of `batch_gpu`."""
    net = make_tiny_precond(train=True)
    params = list(net.parameters())
    optimizer = train_step.make_optimizer(params, dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
                                          torch.device('cpu'))
    labels = torch.zeros([len(images), 0])
    rounds = iter([(images[i:i + batch_gpu], labels[i:i + batch_gpu]) for i in range(0, len(images), batch_gpu)])
    noise = train_step.StepNoise(seed=1, batch_size=len(images), item_shape=images.shape[1:], device=torch.device('cpu'))
    step = train_step.TrainingStep(net=net, ddp=net, params=params, loss_fn=EDM2Loss(), optimizer=optimizer,
                                   encoder=StandardRGBEncoder(), data_iterator=rounds, noise=noise, lr_kwargs=LR_KWARGS,
                                   seed=1, batch_size=len(images), batch_gpu=batch_gpu, max_grad_norm=max_grad_norm)
    finite = step.run(cur_nimg=0)
    return finite, {name: value.clone() for name, value in net.state_dict().items()}


def test_accumulation_rounds_give_the_update_of_one_round():
    images = torch.randint(0, 256, [8, 3, 16, 16], generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    finite_one, one = _one_step(8, images)
    finite_two, two = _one_step(4, images)
    before = make_tiny_precond(train=True).state_dict()
    assert finite_one and finite_two
    assert not torch.equal(one['unet.out_conv.weight'], before['unet.out_conv.weight'])  # the step did update
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_edm1_losses_draw_their_own_noise_from_the_seeded_step():
    from tests.tiny_edm1 import make_tiny_edm1
    from training.augment import AugmentPipe
    from training.loop.edm1_presets import EDM1_AUGMENT_KWARGS
    from training.loss import VPLoss
    assert train_step.draws_own_noise(VPLoss()) and not train_step.draws_own_noise(EDM2Loss())
    assert not train_step.draws_own_noise(lambda net, images, labels, **kwargs: None)  # a wrapper: EDM2's interface
    images = torch.randint(0, 256, [4, 3, 16, 16], generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.eye(4)

    def one_step():
        net = make_tiny_edm1('VPPrecond').train().requires_grad_(True)
        params = list(net.parameters())
        optimizer = train_step.make_optimizer(params, dict(class_name='torch.optim.Adam'), torch.device('cpu'))
        step = train_step.TrainingStep(net=net, ddp=net, params=params, loss_fn=VPLoss(), optimizer=optimizer,
                                       encoder=StandardRGBEncoder(), data_iterator=iter([(images, labels)]), noise=None,
                                       lr_kwargs=LR_KWARGS, seed=1, batch_size=4, batch_gpu=4,
                                       augment_pipe=AugmentPipe(p=1, **EDM1_AUGMENT_KWARGS),
                                       device=torch.device('cpu'))
        assert step.run(cur_nimg=0)
        return net.state_dict()

    first, second = one_step(), one_step()
    before = make_tiny_edm1('VPPrecond').state_dict()
    assert not torch.equal(first['model.dec.16x16_aux_conv.weight'], before['model.dec.16x16_aux_conv.weight'])
    assert all(torch.equal(value, second[key]) for key, value in first.items())  # same seed and step, same update
