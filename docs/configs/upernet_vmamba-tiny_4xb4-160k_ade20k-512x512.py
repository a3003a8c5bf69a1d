# UperNet with a VMamba-T (vmamba_tiny_s1l8) backbone on ADE20K, 512 x 512 crops, 160k iterations, for
# mmsegmentation 1.x:
#     python tools/train.py upernet_vmamba-tiny_4xb4-160k_ade20k-512x512.py   (vmamba.py importable)
# The base is mmsegmentation's Swin-T UperNet; only the backbone, the heads' input channels and the optimizer's
# no-decay keys change. Settings as in the VMamba paper's segmentation experiments: AdamW, lr 6e-5, weight decay
# 0.01, batch 16 (4 GPUs x 4 images), drop path 0.2 for VMamba-T.
_base_ = ["mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"]

custom_imports = dict(imports=["vmamba"], allow_failed_imports=False)  # importing vmamba registers MM_VSSM

model = dict(
    backbone=dict(
        _delete_=True,
        type="MM_VSSM",
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        init_cfg=dict(type="Pretrained", checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                      "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"),
        # vmamba.model_config("vmamba_tiny_s1l8"), with the backbone's norm layout:
        depths=(2, 2, 8, 2), dims=96, ssm_d_state=1, ssm_ratio=1.0, ssm_dt_rank="auto", ssm_conv=3,
        ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=4.0, downsample_version="v3",
        patchembed_version="v2", norm_layer="ln", drop_path_rate=0.2,
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
)

train_dataloader = dict(batch_size=4)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(_delete_=True, custom_keys={
        "A_logs": dict(decay_mult=0.0), "Ds": dict(decay_mult=0.0), "dt_projs_bias": dict(decay_mult=0.0),
        "norm": dict(decay_mult=0.0)}),
)
