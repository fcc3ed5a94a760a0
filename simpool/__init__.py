"""simpool: DINO self-supervised pretraining with SimPool attention pooling on timm backbones."""
