"""The random-LoRA control for the merges that fit on data (full_evaluation.py --loras random)."""
import torch

from .lora import Adapter, Lora


def random_like(adapter: Adapter, generator: torch.Generator) -> Adapter:
    """A control for the merges that fit on data: the same modules, ranks and scales, factors of Gaussian noise scaled
    so that every module's A and update keep `adapter`'s Frobenius norms (G_A, G_B standard normal):

        A' = G_A ||A|| / ||G_A||,   B' = G_B ||B A|| / ||G_B A'||,   so ||s B' A'|| = ||s B A|| and ||A'|| = ||A||

    An update of the same size in every module, with no task in it ("The Appeal and Reality of Recycling LoRAs")."""
    modules = {}
    for name, part in sorted(adapter.modules.items()):
        A, B = part.A.detach().double(), part.B.detach().double()
        GA = torch.randn(A.shape, generator=generator, dtype=torch.float64)
        A_new = GA * A.norm() / GA.norm()
        GB = torch.randn(B.shape, generator=generator, dtype=torch.float64)
        # ||B A||_F^2 = sum((B^T B) * (A A^T)): r x r, no d_out x d_in product
        update = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt()
        B_new = GB * update / ((GB.T @ GB) * (A_new @ A_new.T)).sum().sqrt()
        modules[name] = Lora(A_new.to(part.A.dtype), B_new.to(part.B.dtype), part.scale)
    return Adapter(modules, adapter.base_model)
