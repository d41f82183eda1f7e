"""Training data: LLaVA instruction JSON + images -> grain pipelines of fixed-shape batches."""

from twig_jax.data.llava_data import (  # noqa: F401
    BAD_REASONS,
    BadSample,
    BadSampleReport,
    CallableTokenizer,
    ConversationEncoder,
    DataConfig,
    NoUsableSamples,
    SAMPLE_FIELDS,
    SampleExtension,
    SampleProcessor,
    as_tokenizer,
    build_dataset,
    default_image_preprocessor,
    load_records,
    make_train_iterator,
    normalize_conversation,
    vicuna_v1_text,
)
