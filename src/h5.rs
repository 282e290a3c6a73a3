//! HDF5 helpers shared by every file ulysses writes (token shards, metrics.h5, eval results):
//! scalar attributes, appending to growable datasets, and opening a file that a running job may
//! be writing. They return hdf5's own error; each caller says which file and what it was doing,
//! and [`explain`] turns the library's error stack into what happened.
use hdf5::types::VarLenUnicode;
use hdf5::{H5Type, OpenMode};
use ndarray::{s, Array1, Array2, ArrayView2};
use std::path::Path;

/// Opens a file for reading that a job may be appending to: in SWMR mode (single writer, many
/// readers: metrics.h5 is written that way), which sees a consistent file while the writer flushes,
/// and also opens a file that is closed or was left behind by a killed job. Files written without
/// SWMR support (superblock older than HDF5 1.10) open the ordinary way.
pub fn open_live(path: &Path) -> hdf5::Result<hdf5::File> {
    hdf5::File::open_as(path, OpenMode::ReadSWMR).or_else(|swmr| hdf5::File::open(path).map_err(|_| swmr))
}

/// A variable-length UTF-8 string attribute.
pub fn write_text_attr(loc: &hdf5::Location, name: &str, value: &str) -> hdf5::Result<()> {
    let v: VarLenUnicode = value.parse().map_err(|e| hdf5::Error::from(format!("{e}")))?;
    loc.new_attr::<VarLenUnicode>().create(name)?.write_scalar(&v)
}

/// A scalar attribute of any HDF5 type (integers, floats).
pub fn write_scalar_attr<T: H5Type>(loc: &hdf5::Location, name: &str, value: &T) -> hdf5::Result<()> {
    loc.new_attr::<T>().create(name)?.write_scalar(value)
}

/// Appends `data` to a growable 1-D dataset.
pub fn append_1d<T: H5Type + Clone>(ds: &hdf5::Dataset, data: &[T]) -> hdf5::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let n = ds.shape()[0];
    ds.resize(n + data.len())?;
    ds.write_slice(&Array1::from(data.to_vec()), s![n..n + data.len()])
}

/// Appends `row` as the next row of a growable 2-D dataset whose width is the row's length.
pub fn append_row<T: H5Type>(ds: &hdf5::Dataset, row: Vec<T>) -> hdf5::Result<()> {
    let k = row.len();
    append_rows(ds, Array2::from_shape_vec((1, k), row)?.view())
}

/// Appends `rows` to a growable 2-D dataset whose width is theirs.
pub fn append_rows<T: H5Type>(ds: &hdf5::Dataset, rows: ArrayView2<T>) -> hdf5::Result<()> {
    let (n, (add, k)) = (ds.shape()[0], rows.dim());
    if add == 0 {
        return Ok(());
    }
    ds.resize((n + add, k))?;
    ds.write_slice(&rows, s![n..n + add, ..])
}

/// What an HDF5 error means, in a line: the operating system's error when the library hit one
/// (a full disk, a file-size limit, a permission), else the library's outermost description.
/// Its own text for such failures is a dump of the low-level call (`file write failed: time =
/// ..., filename = ..., file descriptor = 5, errno = 28, error message = ..., buf = ...`).
pub fn explain(err: &hdf5::Error) -> String {
    let hdf5::Error::HDF5(stack) = err else { return err.to_string() };
    let Ok(frames) = stack.clone().expand() else { return err.to_string() };
    let os = frames.iter().find_map(|f| os_error(f.desc()));
    match (os, frames.top()) {
        (Some((errno, text)), _) => format!("{text} (os error {errno})"),
        (None, Some(top)) => top.desc().to_string(),
        (None, None) => err.to_string(),
    }
}

/// `errno = 28, error message = 'No space left on device'` in an HDF5 low-level message.
fn os_error(desc: &str) -> Option<(i32, String)> {
    let errno = desc.split("errno = ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let text = desc.split("error message = '").nth(1)?.split('\'').next()?.to_string();
    Some((errno, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_error_is_found_in_a_low_level_message() {
        let desc = "file write failed: time = Wed Dec  2 02:30:00 2026, filename = 'runs/x/metrics.h5', \
                    file descriptor = 5, errno = 28, error message = 'No space left on device', buf = 0x5, \
                    total write size = 512, bytes this sub-write = 512, bytes actually written = 18446744073709551615, offset = 0";
        assert_eq!(os_error(desc), Some((28, "No space left on device".to_string())));
        assert_eq!(os_error("unable to open file"), None);
    }

    #[test]
    fn a_failure_without_an_os_error_is_the_outermost_description() {
        // A real HDF5 failure: the path is a folder, which the library cannot open as a file.
        let dir = tempfile::tempdir().unwrap();
        let err = hdf5::File::open(dir.path()).unwrap_err();
        let text = explain(&err);
        assert!(!text.contains("file descriptor") && !text.is_empty(), "{text}");
    }
}
