"""Sampling presets of the published EDM v1 models (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", config F of Tables 2 and 5), named after their pickles.

Each preset gives the network URL and the keyword arguments of `edm1_sampler` recommended for it:
18 steps (35 network evaluations) at 32x32, 40 steps (79) for FFHQ and AFHQv2 at 64x64, and for
ImageNet 64x64 256 steps (511) with stochastic churn (Table 5: S_churn = 40, S_min = 0.05,
S_max = 50, S_noise = 1.003). The FID each reaches is in the comment.

The files of '-ve' models and of the unconditional CIFAR-10 'vp' model follow the naming pattern
of the published ones; `EDM1_BASELINES` lists the published baseline pickles (config A, trained with
the original VP, VE and iDDPM formulations), meant for the ablation sampler.
"""

edm1_model_root = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained'


def _preset(name: str, num_steps: int, **churn: float) -> dict:
    return dict(net=f'{edm1_model_root}/{name}.pkl', num_steps=num_steps, **churn)


_IMAGENET_CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

edm1_presets = {
    'edm-cifar10-32x32-cond-vp':     _preset('edm-cifar10-32x32-cond-vp', 18),          # fid 1.79
    'edm-cifar10-32x32-cond-ve':     _preset('edm-cifar10-32x32-cond-ve', 18),          # fid 1.79
    'edm-cifar10-32x32-uncond-vp':   _preset('edm-cifar10-32x32-uncond-vp', 18),        # fid 1.97
    'edm-cifar10-32x32-uncond-ve':   _preset('edm-cifar10-32x32-uncond-ve', 18),        # fid 1.98
    'edm-ffhq-64x64-uncond-vp':      _preset('edm-ffhq-64x64-uncond-vp', 40),           # fid 2.39
    'edm-ffhq-64x64-uncond-ve':      _preset('edm-ffhq-64x64-uncond-ve', 40),           # fid 2.53
    'edm-afhqv2-64x64-uncond-vp':    _preset('edm-afhqv2-64x64-uncond-vp', 40),         # fid 1.96
    'edm-afhqv2-64x64-uncond-ve':    _preset('edm-afhqv2-64x64-uncond-ve', 40),         # fid 2.16
    'edm-imagenet-64x64-cond-adm':   _preset('edm-imagenet-64x64-cond-adm', 256, **_IMAGENET_CHURN),   # fid 1.36
}

EDM1_BASELINES = {
    'baseline-cifar10-32x32-uncond-vp':  f'{edm1_model_root}/baseline/baseline-cifar10-32x32-uncond-vp.pkl',
    'baseline-cifar10-32x32-uncond-ve':  f'{edm1_model_root}/baseline/baseline-cifar10-32x32-uncond-ve.pkl',
    'baseline-imagenet-64x64-cond-adm':  f'{edm1_model_root}/baseline/baseline-imagenet-64x64-cond-adm.pkl',
}

# FID reference statistics of EDM v1 (the ADM baseline has its own ImageNet reference).
edm1_fid_refs_root = 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs'
EDM1_FID_REFS = {name: f'{edm1_fid_refs_root}/{name}.npz'
                 for name in ('cifar10-32x32', 'ffhq-64x64', 'afhqv2-64x64', 'imagenet-64x64', 'imagenet-64x64-baseline')}
