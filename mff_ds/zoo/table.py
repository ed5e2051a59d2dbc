"""The model zoo: released checkpoints, as data (mff_ds.zoo reads it; `python -m mff_ds.zoo list` prints it).

Each entry: `name` (what commands take), `url` (the publisher's file), `sha256` (the hash prefix the released file
name carries, mmpretrain's `..._20230801-3c1bcce4.pth`; None where the publisher gives none: the SHA-256 is then
recorded on first download and checked on every later use), `md5` (a published MD5 prefix, checked on first
download), `kind`, `arch` (our model name), `recipe` (how it was made), `result` (what the publisher reports for
it), `params` (millions of trainable parameters of the architecture, counted with mff_ds / timm), `page` (where
the URL and the result are published). Nothing here is invented: every URL, hash and number is on `page`.
"""
MM_MFF = "https://download.openmmlab.com/mmpretrain/v1.0/mff/"
MM_PAGE = "https://github.com/open-mmlab/mmpretrain/blob/main/configs/mff/README.md"
MAE = "https://dl.fbaipublicfiles.com/mae/"
MAE_PAGE = "https://github.com/facebookresearch/mae/blob/main/README.md"
MAE_FT_PAGE = "https://github.com/facebookresearch/mae/blob/main/FINETUNE.md"
MAE_DEMO_PAGE = "https://github.com/facebookresearch/mae/blob/main/demo/mae_visualize.ipynb"

ENTRIES = [
    # ---- MFF ViT-B/16 (mmpretrain 1.x, configs/mff): fine-tune 100e and linear probe 90e on ImageNet-1k
    dict(name="mff_vit-b_300e", kind="pretrained encoder+decoder", arch="mff_vit_base_patch16", params=114.9,
         url=MM_MFF + "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k/"
                      "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k_20230801-3c1bcce4.pth",
         sha256="3c1bcce4", recipe="mff_vit-b_300e", result="fine-tune 83.0, linear 64.2 top-1", page=MM_PAGE),
    dict(name="mff_vit-b_800e", kind="pretrained encoder+decoder", arch="mff_vit_base_patch16", params=114.9,
         url=MM_MFF + "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k/"
                      "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k_20230801-3af7cd9d.pth",
         sha256="3af7cd9d", recipe="mff_vit-b_800e", result="fine-tune 83.7, linear 68.3 top-1", page=MM_PAGE),
    dict(name="mff_vit-b_300e_ft", kind="classifier", arch="mff_vit_base_patch16", params=86.6,
         url=MM_MFF + "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k/vit-base-p16_8xb128-coslr-100e_in1k/"
                      "vit-base-p16_8xb128-coslr-100e_in1k_20230802-d746fdb7.pth",
         sha256="d746fdb7", recipe="finetune_vit-b_100e on mff_vit-b_300e", result="83.0 top-1", page=MM_PAGE),
    dict(name="mff_vit-b_800e_ft", kind="classifier", arch="mff_vit_base_patch16", params=86.6,
         url=MM_MFF + "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k/vit-base-p16_8xb128-coslr-100e/"
                      "vit-base-p16_8xb128-coslr-100e_20230802-6780e47d.pth",
         sha256="6780e47d", recipe="finetune_vit-b_100e on mff_vit-b_800e", result="83.7 top-1", page=MM_PAGE),
    # the README's link (the metafile's Weights for this entry repeats the 300e fine-tuned file)
    dict(name="mff_vit-b_800e_lin", kind="linear probe", arch="mff_vit_base_patch16", params=86.6,
         url=MM_MFF + "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k/vit-base-p16_8xb2048-linear-coslr-90e/"
                      "vit-base-p16_8xb2048-linear-coslr-90e_20230802-6b1f7bc8.pth",
         sha256="6b1f7bc8", recipe="linprobe_vit-b_90e on mff_vit-b_800e", result="68.3 top-1", page=MM_PAGE),
    # ---- official MAE (facebookresearch/mae, TF/TPU checkpoints converted to PyTorch): 1600 epochs, norm-pix loss
    dict(name="mae_vit-b", kind="pretrained encoder", arch="mae_vit_base_patch16", params=85.8,
         url=MAE + "pretrain/mae_pretrain_vit_base.pth", sha256=None, md5="8cad7c",
         recipe="official MAE 1600e", result="fine-tune 83.6 top-1", page=MAE_PAGE),
    dict(name="mae_vit-l", kind="pretrained encoder", arch="mae_vit_large_patch16", params=303.3,
         url=MAE + "pretrain/mae_pretrain_vit_large.pth", sha256=None, md5="b8b06e",
         recipe="official MAE 1600e", result="fine-tune 85.9 top-1", page=MAE_PAGE),
    dict(name="mae_vit-h", kind="pretrained encoder", arch="mae_vit_huge_patch14", params=630.8,
         url=MAE + "pretrain/mae_pretrain_vit_huge.pth", sha256=None, md5="9bdbb0",
         recipe="official MAE 1600e", result="fine-tune 86.9 top-1", page=MAE_PAGE),
    dict(name="mae_vit-b_ft", kind="classifier", arch="mae_vit_base_patch16", params=86.6,
         url=MAE + "finetune/mae_finetuned_vit_base.pth", sha256=None, md5="1b25e9",
         recipe="official MAE fine-tune 100e", result="83.664 top-1", page=MAE_FT_PAGE),
    dict(name="mae_vit-l_ft", kind="classifier", arch="mae_vit_large_patch16", params=304.3,
         url=MAE + "finetune/mae_finetuned_vit_large.pth", sha256=None, md5="51f550",
         recipe="official MAE fine-tune 50e", result="85.952 top-1", page=MAE_FT_PAGE),
    dict(name="mae_vit-h_ft", kind="classifier", arch="mae_vit_huge_patch14", params=632.0,
         url=MAE + "finetune/mae_finetuned_vit_huge.pth", sha256=None, md5="2541f2",
         recipe="official MAE fine-tune 50e", result="86.928 top-1", page=MAE_FT_PAGE),
    # the visualization demo's checkpoints: encoder and decoder (no result reported for them)
    dict(name="mae_vit-b_vis", kind="pretrained encoder+decoder", arch="mae_vit_base_patch16", params=111.9,
         url=MAE + "visualize/mae_visualize_vit_base.pth", sha256=None,
         recipe="official MAE (visualization demo)", result="none reported", page=MAE_DEMO_PAGE),
    dict(name="mae_vit-l_vis", kind="pretrained encoder+decoder", arch="mae_vit_large_patch16", params=329.5,
         url=MAE + "visualize/mae_visualize_vit_large.pth", sha256=None,
         recipe="official MAE (visualization demo)", result="none reported", page=MAE_DEMO_PAGE),
    dict(name="mae_vit-h_vis", kind="pretrained encoder+decoder", arch="mae_vit_huge_patch14", params=657.1,
         url=MAE + "visualize/mae_visualize_vit_huge.pth", sha256=None,
         recipe="official MAE (visualization demo)", result="none reported", page=MAE_DEMO_PAGE),
]
