# ADN self-distillation (Kang & Lee, NeurIPS 2024): super-net CE and base-net KD from the super-net,
# two passes and one optimizer step; alpha 0.5, T 1, KD over the teacher's top 500 classes (ImageNet).
technique = dict(type='ADN', alpha=0.5, temperature=1.0, topk=500)
