//! Loading HF checkpoints into the model and reading/writing tensor files.
//!
//! The model math in `crate::model` knows nothing about files; this module maps its parameter
//! paths onto HF tensor names and streams the weights in, one shard at a time.

pub mod load;
pub mod save;
pub mod shards;
pub mod tensor_file;

pub use load::{hf_name, load_model, load_weights, WeightDType};
pub use save::{save_model, stable_param_ids};
pub use shards::CheckpointFiles;
pub use tensor_file::{HostTensor, TensorFile};
