"""`wsclip qa-corpus`: ask a local BLIP VQA model the QA-CLIMS questions about every (image, class).

The corpus format, answer cleaning and text sets are in `wsclip.train.qa_corpus`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from wsclip.errors import BadFileError, MissingFileError
from wsclip.train.qa_corpus import QACorpus, QAEntry, lemmatize, load_corpus, qa_label_name, save_corpus
from wsclip.vocab import QA_BACKGROUND_QUESTIONS, QA_FOREGROUND_QUESTIONS


def _load_vqa(model_path, device: str):
    from wsclip.errors import require

    transformers = require("transformers", "vqa", "building a QA corpus (wsclip qa-corpus)")
    path = Path(model_path).expanduser()
    local = path.is_dir()
    try:
        processor = transformers.BlipProcessor.from_pretrained(str(path) if local else str(model_path), local_files_only=True)
        model = transformers.BlipForQuestionAnswering.from_pretrained(
            str(path) if local else str(model_path), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        if not local:
            raise MissingFileError(
                f"VQA model folder not found: {model_path}. Download a BLIP VQA model (e.g. "
                "Salesforce/blip-vqa-base, with `huggingface-cli download`) and pass its folder"
            ) from exc
        raise BadFileError(
            f"{path} is not a Hugging Face BLIP VQA folder (config.json, weights, processor files): {exc}"
        ) from exc
    return processor, model.to(device).eval()


class VQAAnswerer:
    """Answers many questions about few images with a BLIP VQA model, encoding each image once.

    The decoder attends only to real question tokens (Hugging Face's `generate` lets padded
    batches attend to padding), so batched answers equal one-question-at-a-time answers.
    """

    def __init__(self, processor, model, num_beams: int = 3, max_new_tokens: int = 10):
        self.processor, self.model = processor, model
        self.num_beams, self.max_new_tokens = int(num_beams), int(max_new_tokens)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def __call__(self, images: Sequence, questions: Sequence[str], image_index: Sequence[int]) -> list[str]:
        """Raw answers: question n is asked about images[image_index[n]] (uint8 HWC arrays or PIL images)."""
        import torch

        m = self.model
        import numpy as np

        images = [np.array(im) if isinstance(im, np.ndarray) and not im.flags.writeable else im for im in images]
        with torch.inference_mode():
            pix = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, m.dtype)
            image_embeds = m.vision_model(pixel_values=pix)[0]
            tok = self.processor.tokenizer(list(questions), return_tensors="pt", padding=True).to(self.device)
            idx = torch.as_tensor(list(image_index), dtype=torch.long, device=self.device)
            emb = image_embeds[idx]
            emb_mask = torch.ones(emb.shape[:-1], dtype=torch.long, device=self.device)
            q = m.text_encoder(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                encoder_hidden_states=emb, encoder_attention_mask=emb_mask, return_dict=False,
            )[0]
            bos = torch.full((q.shape[0], 1), m.decoder_start_token_id, dtype=torch.long, device=self.device)
            out = m.text_decoder.generate(
                input_ids=bos,
                eos_token_id=m.config.text_config.sep_token_id,
                pad_token_id=m.config.text_config.pad_token_id,
                encoder_hidden_states=q,
                encoder_attention_mask=tok["attention_mask"],
                num_beams=self.num_beams,
                max_new_tokens=self.max_new_tokens,
                min_length=1,
                do_sample=False,
            )
        return [s.strip() for s in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]


def _pairs_of(dataset, i: int) -> list[int]:
    labels = dataset.label_vector(i)
    return [int(k) for k in labels.nonzero().flatten().tolist()]


def build_corpus(
    dataset,
    model_path,
    out,
    device: str = "cpu",
    images_per_batch: int = 2,
    num_beams: int = 3,
    max_new_tokens: int = 10,
    save_every: int = 50,
    limit: int | None = None,
) -> QACorpus:
    """Ask the QA-CLIMS questions about every (image, positive class) of `dataset` and write the corpus to `out`.

    `limit` keeps only the first images of the dataset. Resumable: images already in `out` are
    skipped; the file is rewritten atomically every `save_every` images ("complete": false until the end). Answers are lemmatised.
    """
    from wsclip.progress import progress

    out = Path(out)
    corpus = QACorpus(meta={"complete": False})
    if out.is_file():
        corpus = load_corpus(out)
        corpus.meta["complete"] = False
    processor, model = _load_vqa(model_path, device)
    ask = VQAAnswerer(processor, model, num_beams=num_beams, max_new_tokens=max_new_tokens)
    corpus.meta.update(model=str(model_path), questions={"fg": list(QA_FOREGROUND_QUESTIONS), "bg": list(QA_BACKGROUND_QUESTIONS)})
    names = [qa_label_name(c) for c in dataset.classes]

    n = len(dataset) if limit is None else min(len(dataset), int(limit))
    todo = [i for i in range(n) if dataset.ids[i] not in corpus.images]
    templates = [*QA_FOREGROUND_QUESTIONS, *QA_BACKGROUND_QUESTIONS]
    n_fg = len(QA_FOREGROUND_QUESTIONS)
    done_since_save = 0
    bar = progress(total=len(todo), desc="qa-corpus", unit="img")
    for start in range(0, len(todo), max(1, images_per_batch)):
        chunk = todo[start : start + images_per_batch]
        images, questions, index, owners = [], [], [], []
        for slot, i in enumerate(chunk):
            images.append(dataset.load_image(i))
            for k in _pairs_of(dataset, i):
                for t in templates:
                    questions.append(t.format(names[k]))
                    index.append(slot)
                    owners.append((i, k))
        answers = ask(images, questions, index) if questions else []
        for i in chunk:
            corpus.images[dataset.ids[i]] = {}
        for n0 in range(0, len(questions), len(templates)):
            i, k = owners[n0]
            qs, raw = questions[n0 : n0 + len(templates)], answers[n0 : n0 + len(templates)]
            qa = list(zip(qs, raw))
            corpus.images[dataset.ids[i]][dataset.classes[k]] = QAEntry(
                fg_answers=[lemmatize(a) for a in raw[:n_fg]],
                bg_answers=[lemmatize(a) for a in raw[n_fg:]],
                fg_qa=qa[:n_fg],
                bg_qa=qa[n_fg:],
            )
        bar.update(len(chunk))
        done_since_save += len(chunk)
        if done_since_save >= save_every:
            save_corpus(out, corpus)
            done_since_save = 0
    bar.close()
    corpus.meta["complete"] = True
    save_corpus(out, corpus)
    return corpus
