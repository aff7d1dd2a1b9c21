"""Evaluation of megatron_jp checkpoints and Hugging Face folders (the library behind tools/evaluate.py).

    models.py          open_model(): a checkpoint or HF folder behind one object (tokenizer, masked LM,
                       backbone, task models); custom code only with trust_remote_code
    tasks.py           JGLUE task specs, readers of the v1.3 files, metrics, fine-tuning hyperparameters
    squad.py           JSQuAD: SQuAD v1.1 reader, answer spans through character offsets, EM and F1
    heads.py           transformers task classes where they exist, our heads elsewhere
    finetune.py        one fine-tuning run, and the sweep over the JGLUE paper's grid
    intrinsic.py       masked-word accuracy, pseudo-perplexity, alignment/uniformity, fill-mask probes
    embed.py           sentence embeddings, zero-shot STS, brute-force retrieval
    export_st.py       a sentence-transformers folder
    leaderboard.py     markdown + JSON tables across results, metric-vs-step plots
    records.py         input checks with FILE:LINE messages, atomic outputs

(The masked-word accuracy the trainer logs at each validation, eval.intrinsic: true, is
megatron_jp/training/probe.py: training sits below evaluation.)

Every command writes OUT/predictions.jsonl (id, prediction, gold) and OUT/result.json, and its result
is one JSON object {"task", "metrics", "model", "model_info", "config"}.
"""
