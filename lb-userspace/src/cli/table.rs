//! The table renderer every view shares.

use comfy_table::{Table, presets::NOTHING};

pub(super) fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    // comfy-table pads each line on the left; trim it for plain, kubectl-like output.
    t.lines().map(|l| l.trim().to_owned() + "\n").collect()
}
