"""Train and evaluate Deformable DETR: ``python main.py [flags]`` (see README.md)."""
import argparse


def get_args_parser() -> argparse.ArgumentParser:
    """The original ``main.py`` flags, names, defaults and types, plus the ones README lists."""
    parser = argparse.ArgumentParser("Deformable DETR Detector", add_help=False)
    parser.add_argument("--lr", default=2e-4, type=float)
    parser.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    parser.add_argument("--lr_backbone", default=2e-5, type=float)
    parser.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"],
                        type=str, nargs="+")
    parser.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--lr_drop", default=40, type=int)
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    parser.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of AdamW")

    # Variants
    parser.add_argument("--with_box_refine", default=False, action="store_true")
    parser.add_argument("--two_stage", default=False, action="store_true")

    # Backbone
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="torchvision ResNet: resnet18, resnet34, resnet50 or resnet101")
    parser.add_argument("--backbone_weights", default="imagenet", type=str,
                        help="'imagenet' (torchvision's ImageNet V1 weights, from the torch hub "
                             "cache), 'none' (random init) or a path to a ResNet state_dict")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last ResNet stage by dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                        help="type of positional embedding on top of the image features")
    parser.add_argument("--num_feature_levels", default=4, type=int, help="number of feature levels")

    # Transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="number of encoder layers")
    parser.add_argument("--dec_layers", default=6, type=int, help="number of decoder layers")
    parser.add_argument("--dim_feedforward", default=1024, type=int,
                        help="intermediate size of the feed-forward layers")
    parser.add_argument("--hidden_dim", default=256, type=int, help="transformer width")
    parser.add_argument("--dropout", default=0.1, type=float, help="dropout in the transformer")
    parser.add_argument("--nheads", default=8, type=int, help="attention heads")
    parser.add_argument("--num_queries", default=300, type=int, help="number of query slots")
    parser.add_argument("--dec_n_points", default=4, type=int)
    parser.add_argument("--enc_n_points", default=4, type=int)

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary losses at every decoder layer")

    # Matcher
    parser.add_argument("--set_cost_class", default=2, type=float, help="class weight in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")

    # Loss coefficients
    parser.add_argument("--cls_loss_coef", default=2, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--focal_alpha", default=0.25, type=float)

    # Dataset
    parser.add_argument("--dataset_file", default="coco", choices=("coco",))
    parser.add_argument("--coco_path", default="./data/coco", type=str)
    parser.add_argument("--num_classes", default=91, type=int,
                        help="classifier outputs: largest category id + 1 (91 for COCO)")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default="cuda", help="device to use for training / testing")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--cache_mode", default=False, action="store_true",
                        help="keep the images in memory, each node holding its own share")
    return parser


if __name__ == "__main__":
    cli = argparse.ArgumentParser("Deformable DETR training and evaluation script", parents=[get_args_parser()])
    cli.parse_args()
