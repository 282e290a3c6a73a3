//! HDF5 helpers shared by every file ulysses writes (token shards, metrics.h5, eval results):
//! scalar attributes, appending to growable datasets, and opening a file that a running job may
//! be writing. They return hdf5's own error; each caller says which file and what it was doing.
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
