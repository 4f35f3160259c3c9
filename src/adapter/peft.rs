//! PEFT-format adapter folders (filled in below).
