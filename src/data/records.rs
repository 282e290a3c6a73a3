//! The records of `data prepare`'s inputs, one JSON object at a time whatever the file: JSONL
//! (plain, `.gz` or `.zst`), Parquet, Arrow IPC (file or stream) and a folder written by
//! Hugging Face `datasets.save_to_disk` (its Arrow files in `state.json`'s order). Only the fields
//! asked for are read from columnar files, so a wide table streams at the cost of its text.
use super::DataError;
use arrow_array::{Array, RecordBatch};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// How an input file holds its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFile {
    /// One JSON object per line, maybe compressed (by extension: `.gz`, `.zst`).
    Jsonl,
    Parquet,
    /// Arrow IPC, the file (`ARROW1` magic) or the stream format (`datasets` writes the latter).
    Arrow,
}

impl RecordFile {
    /// What `path` holds, by its first bytes (Parquet and Arrow files are recognized whatever
    /// their name), then its extension; None: plain text.
    pub fn detect(path: &Path) -> Result<Option<RecordFile>, DataError> {
        let mut head = [0u8; 8];
        let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).map_err(|e| DataError::io(path, e))?;
        let head = &head[..n];
        if head.starts_with(b"PAR1") {
            return Ok(Some(RecordFile::Parquet));
        }
        // The IPC stream format begins with a continuation marker; the file format with ARROW1.
        if head.starts_with(b"ARROW1") || head.starts_with(&[0xff, 0xff, 0xff, 0xff]) {
            return Ok(Some(RecordFile::Arrow));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let name = name.trim_end_matches(".gz").trim_end_matches(".zst");
        Ok(match name.rsplit('.').next() {
            Some("jsonl" | "json" | "ndjson") => Some(RecordFile::Jsonl),
            Some("parquet") => Some(RecordFile::Parquet),
            Some("arrow" | "feather" | "ipc") => Some(RecordFile::Arrow),
            _ => None,
        })
    }
}

/// One record and where it is: its number in the file (from 1; for JSONL the line).
pub struct Record {
    pub number: u64,
    pub fields: Map<String, Value>,
}

/// Calls `each` with every record of `path` in order. `fields`: the columns a columnar file
/// needs to give (the others are not read; one it lacks is simply absent from the record).
/// `progress` is told the input bytes consumed.
pub fn read_records(
    path: &Path,
    kind: RecordFile,
    fields: &[&str],
    progress: &mut dyn FnMut(u64),
    each: &mut dyn FnMut(Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    // Columnar files count as read when done (their bytes do not arrive in record order).
    let size = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
    match kind {
        RecordFile::Jsonl => read_jsonl(path, progress, each),
        RecordFile::Parquet => {
            let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
            let bad = |e: parquet::errors::ParquetError| columnar_error(path, "Parquet", e);
            let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).map_err(bad)?;
            let wanted = wanted_columns(builder.schema(), fields);
            let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), wanted);
            let reader = builder.with_projection(mask).with_batch_size(1024).build().map_err(bad)?;
            read_batches(path, reader, fields, each)?;
            progress(size);
            Ok(())
        }
        RecordFile::Arrow => {
            let mut file = BufReader::new(std::fs::File::open(path).map_err(|e| DataError::io(path, e))?);
            let bad = |e: arrow_schema::ArrowError| columnar_error(path, "Arrow IPC", e);
            let is_file = file.fill_buf().map_err(|e| DataError::io(path, e))?.starts_with(b"ARROW1");
            if is_file {
                let reader = arrow_ipc::reader::FileReader::try_new(file, None).map_err(bad)?;
                read_batches(path, reader, fields, each)?;
            } else {
                let reader = arrow_ipc::reader::StreamReader::try_new(file, None).map_err(bad)?;
                read_batches(path, reader, fields, each)?;
            }
            progress(size);
            Ok(())
        }
    }
}

fn columnar_error(path: &Path, format: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Usage(format!(
        "{}: cannot read as {format} ({e}); the file is truncated, corrupt or not {format}",
        path.display()
    ))
}

fn wanted_columns(schema: &arrow_schema::Schema, fields: &[&str]) -> Vec<usize> {
    schema.fields().iter().enumerate().filter(|(_, f)| fields.contains(&f.name().as_str())).map(|(i, _)| i).collect()
}

fn read_batches<E: std::fmt::Display>(
    path: &Path,
    batches: impl Iterator<Item = Result<RecordBatch, E>>,
    fields: &[&str],
    each: &mut dyn FnMut(Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut number = 0u64;
    for batch in batches {
        let batch = batch.map_err(|e| {
            let detail = format!("after record {number}: {e}");
            DataError::Usage(format!("{}: cannot read ({detail}); the file is truncated or corrupt", path.display()))
        })?;
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            number += 1;
            let mut values = Map::new();
            let columns = schema.fields().iter().zip(batch.columns());
            for (field, column) in columns.filter(|(f, _)| fields.contains(&f.name().as_str())) {
                let value = to_json(column.as_ref(), row).map_err(|message| DataError::Record {
                    path: path.into(),
                    record: number,
                    field: field.name().clone(),
                    message,
                })?;
                values.insert(field.name().clone(), value);
            }
            each(Record { number, fields: values })?;
        }
    }
    Ok(())
}

/// Entry `row` of an Arrow column as JSON: the types datasets use for text and chat records
/// (strings, numbers, booleans, lists, structs, dictionaries of strings). Any other type is a
/// message naming it.
fn to_json(array: &dyn Array, row: usize) -> Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    use arrow_schema::DataType as T;
    if array.is_null(row) {
        return Ok(Value::Null);
    }
    let list = |values: arrow_array::ArrayRef| -> Result<Value, String> {
        (0..values.len()).map(|i| to_json(values.as_ref(), i)).collect::<Result<Vec<_>, _>>().map(Value::Array)
    };
    Ok(match array.data_type() {
        T::Utf8 => Value::from(array.as_string::<i32>().value(row)),
        T::LargeUtf8 => Value::from(array.as_string::<i64>().value(row)),
        T::Utf8View => Value::from(array.as_string_view().value(row)),
        T::Boolean => Value::from(array.as_boolean().value(row)),
        T::Int8 => Value::from(array.as_primitive::<Int8Type>().value(row)),
        T::Int16 => Value::from(array.as_primitive::<Int16Type>().value(row)),
        T::Int32 => Value::from(array.as_primitive::<Int32Type>().value(row)),
        T::Int64 => Value::from(array.as_primitive::<Int64Type>().value(row)),
        T::UInt8 => Value::from(array.as_primitive::<UInt8Type>().value(row)),
        T::UInt16 => Value::from(array.as_primitive::<UInt16Type>().value(row)),
        T::UInt32 => Value::from(array.as_primitive::<UInt32Type>().value(row)),
        T::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(row)),
        T::Float32 => Value::from(array.as_primitive::<Float32Type>().value(row)),
        T::Float64 => Value::from(array.as_primitive::<Float64Type>().value(row)),
        T::List(_) => list(array.as_list::<i32>().value(row))?,
        T::LargeList(_) => list(array.as_list::<i64>().value(row))?,
        T::FixedSizeList(..) => list(array.as_fixed_size_list().value(row))?,
        T::Struct(fields) => {
            let s = array.as_struct();
            let mut map = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                map.insert(field.name().clone(), to_json(column.as_ref(), row)?);
            }
            Value::Object(map)
        }
        T::Dictionary(..) => {
            let d = array.as_any_dictionary();
            let key = d.normalized_keys()[row];
            to_json(d.values().as_ref(), key)?
        }
        other => {
            return Err(format!(
                "has Arrow type {other}, which data prepare does not read (strings, numbers, lists and structs)"
            ))
        }
    })
}

/// JSONL, decompressed by extension; every line is checked to be UTF-8 and one JSON object.
fn read_jsonl(
    path: &Path,
    progress: &mut dyn FnMut(u64),
    each: &mut dyn FnMut(Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let name = path.to_string_lossy().to_lowercase();
    let mut reader: Box<dyn BufRead> = if name.ends_with(".gz") {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))))
    } else if name.ends_with(".zst") {
        Box::new(BufReader::new(zstd::stream::read::Decoder::new(file).map_err(|e| DataError::io(path, e))?))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, file))
    };
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        progress(n as u64);
        line += 1;
        let input_err = |message: String| DataError::Input { path: path.into(), line, message };
        let text = std::str::from_utf8(&buf).map_err(|e| {
            input_err(format!("invalid UTF-8 at byte {} of the line; convert the file to UTF-8", e.valid_up_to()))
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => each(Record { number: line, fields })?,
            Ok(_) => return Err(input_err("is not a JSON object".into())),
            Err(e) => return Err(input_err(format!("not valid JSON ({e})"))),
        }
    }
}

/// The Arrow files of a folder written by `datasets.save_to_disk` (None: not such a folder):
/// `state.json`'s `_data_files` in order, or its `*.arrow` files by name.
pub fn saved_dataset_files(dir: &Path) -> Result<Option<Vec<PathBuf>>, DataError> {
    if dir.join("dataset_dict.json").is_file() {
        let splits = std::fs::read_to_string(dir.join("dataset_dict.json")).unwrap_or_default();
        return Err(DataError::Usage(format!(
            "{} holds several splits ({}); pass one split's folder, e.g. {}/train",
            dir.display(),
            splits.trim(),
            dir.display()
        )));
    }
    let state = dir.join("state.json");
    if !state.is_file() && !dir.join("dataset_info.json").is_file() {
        return Ok(None);
    }
    if state.is_file() {
        let text = std::fs::read_to_string(&state).map_err(|e| DataError::io(&state, e))?;
        let bad = |m: String| DataError::Input { path: state.clone(), line: 1, message: m };
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let files = json.get("_data_files").and_then(|f| f.as_array()).ok_or_else(|| {
            bad("has no list `_data_files`; expected the state.json that datasets.save_to_disk writes".into())
        })?;
        let names: Option<Vec<PathBuf>> =
            files.iter().map(|f| f.get("filename").and_then(|n| n.as_str()).map(|n| dir.join(n))).collect();
        let names = names.ok_or_else(|| bad("`_data_files` entries need a string `filename`".into()))?;
        return Ok(Some(names));
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "arrow"))
        .collect();
    names.sort();
    Ok(Some(names))
}
