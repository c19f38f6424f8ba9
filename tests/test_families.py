

def test_stylegan_modulated_convolution_equals_per_image_modulated_weights():
    # the fast form (modulate inputs, shared conv, demodulate outputs) is StyleGAN2's
    # per-image weight modulation and demodulation, computed image by image here
    torch.manual_seed(0)
    conv = stylegan.ModulatedConv(6, 5, 3, 4)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    style = conv.affine(w)
    expected = []
    for i in range(3):
        weight = conv.scale * conv.weight * style[i].view(1, 6, 1, 1)
        weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        expected.append(torch.nn.functional.conv2d(x[i:i + 1], weight, padding=1)
                        + conv.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(conv(x, w), torch.cat(expected), rtol=1e-4, atol=1e-5)
