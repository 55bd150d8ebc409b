"""Which sampler a network gets: EDM2 networks the ODE solvers, EDM v1 networks EDM v1's samplers and defaults
(or the ODE solvers over their noise range), with one-line errors for options of the other family."""

import pytest
import torch

from tests import tiny_edm1
from tests.tiny import make_tiny_precond
from training.sampling import edm1_sampler as edm1
from training.sampling import families
from training.sampling.sampler import StackedRandomGenerator
from training.sampling.solvers import sample

UNSET = dict(solver=None, discretization=None, num_steps=None, sigma_min=None, sigma_max=None, schedule=None,
             scaling=None, alpha=None, guidance=1)


@pytest.fixture(scope='module')
def nets():
    return dict(edm2=make_tiny_precond(label_dim=0), vp=tiny_edm1.make_tiny_edm1('VPPrecond', label_dim=0),
                ve=tiny_edm1.make_tiny_edm1('VEPrecond', label_dim=0))


def test_edm2_networks_get_the_ode_solvers_with_their_defaults(nets):
    fn, kwargs = families.resolve_sampler(nets['edm2'], **UNSET)
    assert fn is sample and kwargs == dict(guidance=1)
    fn, kwargs = families.resolve_sampler(nets['edm2'], **dict(UNSET, solver='dpm++3m', num_steps=12))
    assert fn is sample and kwargs == dict(guidance=1, solver='dpm++3m', num_steps=12)
    assert families.describe_sampler(fn, **kwargs) == \
        'Sampler: dpm++3m, 12 steps, edm time steps; network evaluations per image: 12 main'


@pytest.mark.parametrize('options, message', [
    (dict(discretization='vp'), '--disc=vp belongs to the EDM v1 ablation sampler'),
    (dict(schedule='ve'), '--schedule belongs to the EDM v1 ablation sampler'),
    (dict(alpha=0.5), '--alpha belongs to the EDM v1 ablation sampler'),
])
def test_edm2_networks_refuse_the_ablation_options(nets, options, message):
    with pytest.raises(ValueError, match=message):
        families.resolve_sampler(nets['edm2'], **dict(UNSET, **options))


def test_edm1_networks_default_to_the_v1_edm_sampler_with_18_steps(nets):
    fn, kwargs = families.resolve_sampler(nets['vp'], **UNSET)
    assert fn is families.edm1_sample and kwargs == dict(guidance=1, num_steps=18)
    assert families.count_evaluations(fn, **kwargs) == dict(main=35, guide=0)
    assert families.describe_sampler(fn, **kwargs) == \
        'Sampler: EDM v1 EDM sampler (Alg. 2), 18 steps; network evaluations per image: 35 main'


@pytest.mark.parametrize('option', ['solver', 'discretization', 'schedule', 'scaling', 'alpha'])
def test_any_ablation_option_selects_the_ablation_sampler(nets, option):
    value = dict(solver='heun', discretization='edm', schedule='linear', scaling='none', alpha=1)[option]
    fn, kwargs = families.resolve_sampler(nets['vp'], **dict(UNSET, **{option: value}))
    assert fn is families.edm1_sample and edm1.choose_sampler(**kwargs)[0] is edm1.ablation_sampler
    assert families.describe_sampler(fn, **kwargs).startswith('Sampler: EDM v1 ablation sampler: heun (alpha 1), 18 steps')


def test_edm1_sample_is_the_chosen_v1_sampler(nets):
    net = nets['vp']
    noise = StackedRandomGenerator('cpu', [3, 4]).randn([2, 3, 16, 16])
    with torch.no_grad():
        for options, reference in ((dict(num_steps=3), edm1.edm1_sampler),
                                   (dict(num_steps=3, solver='euler', discretization='vp', schedule='vp', scaling='vp'),
                                    edm1.ablation_sampler)):
            expected = reference(net, noise, randn_like=torch.zeros_like, **options)
            got = families.edm1_sample(net, noise, randn_like=torch.zeros_like, **options)
            assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_edm1_networks_take_the_ode_solvers_over_their_noise_range(nets):
    fn, kwargs = families.resolve_sampler(nets['ve'], **dict(UNSET, solver='dpm++2m'))
    assert fn is sample and kwargs['num_steps'] == 18
    assert (kwargs['sigma_min'], kwargs['sigma_max']) == (nets['ve'].sigma_min, 80)   # VE: 0.02 ... 100
    fn, kwargs = families.resolve_sampler(nets['vp'], **dict(UNSET, discretization='logsnr', sigma_max=500))
    assert fn is sample and (kwargs['sigma_min'], kwargs['sigma_max']) == (0.002, nets['vp'].sigma_max)
    with pytest.raises(ValueError, match='--scaling belongs to the EDM v1 ablation sampler'):
        families.resolve_sampler(nets['vp'], **dict(UNSET, solver='ipndm', scaling='vp'))
    with pytest.raises(ValueError, match='--disc=iddpm belongs to the EDM v1 ablation sampler'):
        families.resolve_sampler(nets['vp'], **dict(UNSET, solver='dpm++3m', discretization='iddpm'))


def test_option_names_are_checked_for_every_family():
    families.check_option_names(solver='euler', discretization='iddpm', num_steps=None, S_churn=None)
    with pytest.raises(ValueError, match='--S_churn is only defined for --solver=heun or euler'):
        families.check_option_names(solver='dpm++3m', S_churn=1)
    with pytest.raises(ValueError, match='unknown time-step discretization "cosine"'):
        families.check_option_names(discretization='cosine')
