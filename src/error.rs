//! One error type for the whole crate: every message names the file, field or tensor at fault.

use std::path::PathBuf;

/// Everything that can go wrong on user input or on disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder the user pointed at does not exist.
    #[error("{path}: not found. {hint}")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the user must do (download, pass another path...).
        hint: String,
    },
    /// An I/O error while reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file that does not parse.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// What serde said, with line and column.
        message: String,
    },
    /// A config value that is present but wrong.
    #[error("{path}: invalid config value `{field}`: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The dotted field name, e.g. `text_config.num_key_value_heads`.
        field: String,
        /// What was expected.
        message: String,
    },
    /// A safetensors file that cannot be parsed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint or input file.
    #[error("tensor `{name}` is missing from {location}")]
    MissingTensor {
        /// HF name of the tensor.
        name: String,
        /// Where it was looked for (file or checkpoint folder).
        location: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {location}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// HF name of the tensor.
        name: String,
        /// Where it was found.
        location: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape on disk.
        found: Vec<usize>,
    },
    /// A tensor has a dtype we cannot read.
    #[error("tensor `{name}` in {location}: unsupported dtype {found}, expected {expected}")]
    BadDtype {
        /// HF name of the tensor.
        name: String,
        /// Where it was found.
        location: String,
        /// The dtypes we accept.
        expected: String,
        /// The dtype on disk.
        found: String,
    },
    /// Model inputs that are inconsistent with each other or with the config.
    #[error("invalid input: {0}")]
    Input(String),
    /// A command-line value that is not allowed.
    #[error("invalid argument {arg}: {message}")]
    Argument {
        /// The flag, e.g. `--dtype`.
        arg: String,
        /// What is allowed.
        message: String,
    },
}

/// Crate-wide result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
