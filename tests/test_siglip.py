"""SigLIP towers read as LLaVA-NeXT's SigLipVisionTower reads them (llava/model/multimodal_encoder/siglip_encoder.py):
the last encoder layer and the pooling head gone, every patch (no CLS) of the layer before it, before post_layernorm;
its image processor (an exact resize, mean and std 0.5, no crop); a whole SiglipModel folder's vision half; the
image token count everywhere. End to end (train, generate, export): tests/test_families.py."""


import pytest
import torch
from conftest import draw_shape, siglip_folder
from PIL import Image
from transformers import SiglipModel, SiglipVisionModel
from transformers.models.siglip import SiglipImageProcessorPil

from minillava.data import load_image_processor, process_image
from minillava.formats import clip_vision_state, folder_tower_config, read_weights
from minillava.metrics import FlopModel
from minillava.model import LlavaSettings, build_llava_from_config


@pytest.mark.parametrize("whole", [False, True])
def test_features_are_the_second_to_last_layer_every_patch(tmp_path, whole, assets):
    from transformers import AutoConfig

    folder = siglip_folder(str(tmp_path), whole)
    config = folder_tower_config(folder, "--vision_tower")
    assert (config.num_hidden_layers, config.vision_use_head) == (2, False)  # LLaVA-NeXT deletes a layer and the head
    settings = LlavaSettings(mm_projector_type="mlp2x_gelu")  # select layer -2 (LLaVA-NeXT's scripts), patch
    model = build_llava_from_config(AutoConfig.from_pretrained(assets["llm"]), config, settings)
    state = clip_vision_state(read_weights(folder, "--vision_tower"), config)
    assert not any(".head." in k or ".layers.2." in k for k in state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("vision_tower.")]
    full = SiglipModel.from_pretrained(folder).vision_model if whole else SiglipVisionModel.from_pretrained(folder)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours = model.vision_tower(pixels)
        reference = full(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (2, 4, 32) and torch.allclose(ours, reference, atol=1e-6)
    assert model.num_image_tokens == 4 and model.encode_images(pixels, torch.float32).shape == (2, 4, 32)
    flops = FlopModel.from_model(model)
    assert (flops.vit_tokens, flops.vit_layers_run, flops.image_tokens) == (4, 2, 4)


def test_other_select_settings_are_refused(tmp_path, assets):
    from transformers import AutoConfig

    config = folder_tower_config(siglip_folder(str(tmp_path)), "--vision_tower")
    llm = AutoConfig.from_pretrained(assets["llm"])
    for bad in (LlavaSettings(mm_vision_select_layer=-3), LlavaSettings(mm_vision_select_feature="cls_patch")):
        with pytest.raises(ValueError, match="SigLIP tower is read as LLaVA-NeXT reads it"):
            build_llava_from_config(llm, config, bad)


def test_processor_resizes_exactly_with_mean_and_std_one_half(tmp_path):
    processor = load_image_processor(siglip_folder(str(tmp_path)))
    assert isinstance(processor, SiglipImageProcessorPil)
    img = draw_shape("red", "circle", size=(40, 20))
    pixels = process_image(img, processor, "square")  # squashed to 28 x 28, as LLaVA-NeXT's SigLipImageProcessor
    expected = torch.tensor(list(img.resize((28, 28), Image.Resampling.BICUBIC).getdata()), dtype=torch.float32)
    expected = (expected.view(28, 28, 3).permute(2, 0, 1) / 255 - 0.5) / 0.5
    assert pixels.shape == (3, 28, 28) and torch.allclose(pixels, expected, atol=1e-5)
    padded = process_image(img, processor, "pad")  # expand2square with (127, 127, 127)
    assert padded[:, 0, 0].tolist() == pytest.approx([(127 / 255 - 0.5) / 0.5] * 3, abs=1e-5)
