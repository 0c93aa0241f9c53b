//! Pure: what a kubelet's publish call asks for, where its tree and overlay directories
//! live on the node, the overlay's mount options, and which trees the mount table uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::snapshot_path::SnapshotPath;

/// `volumeAttributes` the webhook writes into a checkout's CSI volume.
pub const REPOSITORY_ATTRIBUTE: &str = "repository";
pub const UID_ATTRIBUTE: &str = "uid";
pub const GID_ATTRIBUTE: &str = "gid";
/// What the kubelet adds with `podInfoOnMount`.
pub const POD_NAMESPACE_ATTRIBUTE: &str = "csi.storage.k8s.io/pod.namespace";

/// One checkout's shared tree as a pod asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeRequest {
    pub repository: SnapshotPath,
    pub uid: u32,
    pub gid: u32,
}

/// Why a publish gets an empty directory instead of a shared tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("volume attribute `{0}` is missing")]
    Missing(&'static str),
    #[error("volume attribute `{name}`: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("the pod is in namespace `{pod}`, and this node cache serves only `{served}`'s pods")]
    OtherNamespace { pod: String, served: String },
}

/// The tree a publish asks for, from the volume context, for pods of `namespace` only.
pub fn tree_request(
    context: &HashMap<String, String>,
    namespace: &str,
) -> Result<TreeRequest, Refused> {
    let get = |name: &'static str| context.get(name).ok_or(Refused::Missing(name));
    let pod_namespace = get(POD_NAMESPACE_ATTRIBUTE)?;
    if pod_namespace != namespace {
        return Err(Refused::OtherNamespace {
            pod: pod_namespace.clone(),
            served: namespace.to_owned(),
        });
    }
    let repository = get(REPOSITORY_ATTRIBUTE)?;
    let repository =
        SnapshotPath::parse_repository(repository).map_err(|reason| Refused::Invalid {
            name: REPOSITORY_ATTRIBUTE,
            reason,
        })?;
    let id = |name: &'static str| {
        get(name)?.parse::<u32>().map_err(|err| Refused::Invalid {
            name,
            reason: err.to_string(),
        })
    };
    Ok(TreeRequest {
        repository,
        uid: id(UID_ATTRIBUTE)?,
        gid: id(GID_ATTRIBUTE)?,
    })
}

/// A kubelet path the plugin mounts at: absolute, plain, inside `<kubelet dir>/pods/`.
pub fn target_path(kubelet_dir: &Path, target: &str) -> Result<PathBuf, String> {
    let path = Path::new(target);
    // On the text: Path's components would drop a `.` and an empty segment unseen.
    let plain = target.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
    });
    if !plain || !path.starts_with(kubelet_dir.join("pods")) {
        return Err(format!(
            "target path `{target}` is not a plain path under {}/pods",
            kubelet_dir.display()
        ));
    }
    Ok(path.to_owned())
}

/// A volume id as a directory name of its own (the kubelet's are `csi-<hex>`).
pub fn volume_id(id: &str) -> Result<&str, String> {
    let plain = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    plain
        .then_some(id)
        .ok_or_else(|| format!("volume id `{id}` is not a plain name"))
}

/// Where the shared trees and the pods' overlay directories live on the node disk.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// The directory in a tree, and so in every overlay of it, that holds the repository:
/// the app containers mount it as their subPath.
pub const TREE: &str = "tree";

impl Layout {
    /// Under `root`, which must be a path the overlay's options can carry.
    pub fn new(root: PathBuf) -> Result<Layout, String> {
        let text = root.to_string_lossy();
        if text.contains([',', ':', '\\']) || text.chars().any(char::is_whitespace) {
            return Err(format!(
                "{text}: overlay mount options cannot name a path with `,`, `:`, `\\` or white space"
            ));
        }
        Ok(Layout { root })
    }

    pub fn trees(&self) -> PathBuf {
        self.root.join("trees")
    }

    /// A finished tree: `<identity>-<revision>`, renamed into place once complete.
    pub fn tree(&self, request: &TreeRequest, pin: &str) -> PathBuf {
        self.trees()
            .join(format!("{}-{}", identity(request), short_hash(pin)))
    }

    /// Where trees are extracted before their rename.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Where `tree` is extracted before its rename.
    pub fn staging(&self, tree: &Path) -> PathBuf {
        let name = tree.file_name().map(|n| n.to_string_lossy().into_owned());
        self.staging_dir().join(name.unwrap_or_default())
    }

    /// A pod volume's overlay upper and work directories.
    pub fn volume(&self, volume_id: &str) -> PathBuf {
        self.root.join("volumes").join(volume_id)
    }
}

/// Which trees hold the same repository for the same owner: all revisions of one.
fn identity(request: &TreeRequest) -> String {
    short_hash(&format!(
        "{}\0{}\0{}",
        request.repository.repository(),
        request.uid,
        request.gid
    ))
}

/// The identity part of a tree directory's name.
pub fn identity_of(tree_name: &str) -> Option<&str> {
    tree_name.split_once('-').map(|(identity, _)| identity)
}

fn short_hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

/// `lowerdir=…,upperdir=…,workdir=…` for an overlay of `tree` with `volume`'s directories.
pub fn overlay_options(tree: &Path, volume: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        tree.display(),
        volume.join("upper").display(),
        volume.join("work").display()
    )
}

/// A line of `/proc/self/mountinfo`: where it is mounted, its type and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub super_options: String,
}

/// The entries of a mountinfo text; malformed lines are skipped.
pub fn mount_entries(mountinfo: &str) -> Vec<MountEntry> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, filesystem) = line.split_once(" - ")?;
            let mount_point = mount.split(' ').nth(4)?;
            let mut filesystem = filesystem.split(' ');
            let fs_type = filesystem.next()?;
            let super_options = filesystem.nth(1)?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_owned(),
                super_options: unescape(super_options),
            })
        })
        .collect()
}

/// The lower directories the overlays in `entries` use.
pub fn lower_dirs(entries: &[MountEntry]) -> Vec<PathBuf> {
    entries
        .iter()
        .filter(|entry| entry.fs_type == "overlay")
        .flat_map(|entry| entry.super_options.split(','))
        .filter_map(|option| option.strip_prefix("lowerdir="))
        .flat_map(|dirs| dirs.split(':'))
        .map(PathBuf::from)
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mountinfo as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes.get(index + 1..index + 4).filter(|digits| {
            bytes[index] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        });
        match octal.and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                index += 4;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn asked() -> HashMap<String, String> {
        context(&[
            (REPOSITORY_ATTRIBUTE, "github.com/org/repo"),
            (UID_ATTRIBUTE, "1000"),
            (GID_ATTRIBUTE, "2000"),
            (POD_NAMESPACE_ATTRIBUTE, "ci"),
            ("csi.storage.k8s.io/pod.name", "build-1"),
        ])
    }

    #[test]
    fn a_publish_names_a_repository_and_an_owner_for_a_pod_of_the_served_namespace() {
        let request = tree_request(&asked(), "ci").expect("request");
        assert_eq!(request.repository.repository(), "github.com/org/repo");
        assert_eq!((request.uid, request.gid), (1000, 2000));
    }

    #[test]
    fn a_pod_of_another_namespace_is_refused() {
        assert_eq!(
            tree_request(&asked(), "other"),
            Err(Refused::OtherNamespace {
                pod: "ci".to_owned(),
                served: "other".to_owned()
            })
        );
        let mut without = asked();
        without.remove(POD_NAMESPACE_ATTRIBUTE);
        assert_eq!(
            tree_request(&without, "ci"),
            Err(Refused::Missing(POD_NAMESPACE_ATTRIBUTE))
        );
    }

    #[test]
    fn bad_attributes_are_refused_with_their_name() {
        for (name, value) in [
            (REPOSITORY_ATTRIBUTE, "github.com/../etc"),
            (REPOSITORY_ATTRIBUTE, ""),
            (UID_ATTRIBUTE, "-1"),
            (UID_ATTRIBUTE, "root"),
            (GID_ATTRIBUTE, "4294967296"),
        ] {
            let mut bad = asked();
            bad.insert(name.to_owned(), value.to_owned());
            match tree_request(&bad, "ci") {
                Err(Refused::Invalid { name: named, .. }) => assert_eq!(named, name, "{value}"),
                other => panic!("{name}={value}: {other:?}"),
            }
        }
        for name in [REPOSITORY_ATTRIBUTE, UID_ATTRIBUTE, GID_ATTRIBUTE] {
            let mut without = asked();
            without.remove(name);
            assert_eq!(tree_request(&without, "ci"), Err(Refused::Missing(name)));
        }
    }

    #[test]
    fn targets_are_plain_paths_under_the_kubelets_pods() {
        let kubelet = Path::new("/var/lib/kubelet");
        let good =
            "/var/lib/kubelet/pods/8d1c/volumes/kubernetes.io~csi/snapcache-checkout-0/mount";
        assert_eq!(target_path(kubelet, good), Ok(PathBuf::from(good)));
        for bad in [
            "relative/pods/x",
            "/var/lib/kubelet/plugins/x",
            "/var/lib/kubelet/pods/../../../etc",
            "/var/lib/kubelet/pods/./x",
            "/var/lib/kubelet/pods//x",
            "/var/lib/kubelet/pods/x/",
            "/etc",
            "",
        ] {
            assert!(target_path(kubelet, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_ids_are_plain_names() {
        assert_eq!(volume_id("csi-5e0c7f4e"), Ok("csi-5e0c7f4e"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(volume_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trees_are_per_repository_owner_and_revision() {
        let layout = Layout::new(PathBuf::from("/cache/shared-trees")).expect("layout");
        let request = tree_request(&asked(), "ci").expect("request");
        let tree = layout.tree(&request, "etag:one");
        assert!(tree.starts_with("/cache/shared-trees/trees"));
        let name = tree
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let other_revision = layout.tree(&request, "etag:two");
        let other_name = other_revision
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_ne!(tree, other_revision);
        assert_eq!(identity_of(&name), identity_of(&other_name));
        let other_owner = TreeRequest {
            uid: 1001,
            ..request.clone()
        };
        let owner_name = layout.tree(&other_owner, "etag:one");
        let owner_name = owner_name
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_ne!(identity_of(&name), identity_of(&owner_name));
        assert_eq!(layout.tree(&request, "etag:one"), tree, "stable");
        assert_eq!(
            layout.staging(&tree),
            PathBuf::from("/cache/shared-trees/staging").join(&name)
        );
    }

    #[test]
    fn the_layout_root_must_fit_in_overlay_options() {
        for bad in ["/a,b", "/a:b", "/a b", "/a\\b"] {
            assert!(Layout::new(PathBuf::from(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlay_options_stack_the_pods_directories_on_the_tree() {
        assert_eq!(
            overlay_options(Path::new("/d/trees/ab-cd"), Path::new("/d/volumes/csi-1")),
            "lowerdir=/d/trees/ab-cd,upperdir=/d/volumes/csi-1/upper,workdir=/d/volumes/csi-1/work"
        );
    }

    #[test]
    fn the_mount_table_names_the_trees_in_use() {
        let mountinfo = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
610 27 0:90 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/v/mount rw,relatime shared:300 - overlay overlay rw,lowerdir=/d/trees/ab-cd,upperdir=/d/volumes/csi-1/upper,workdir=/d/volumes/csi-1/work
611 27 0:91 / /mnt/with\\040space rw - overlay overlay rw,lowerdir=/d/trees/ef-01:/d/base,upperdir=/u,workdir=/w
garbage
";
        let entries = mount_entries(mountinfo);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(entries[1].fs_type, "overlay");
        assert_eq!(
            lower_dirs(&entries),
            vec![
                PathBuf::from("/d/trees/ab-cd"),
                PathBuf::from("/d/trees/ef-01"),
                PathBuf::from("/d/base")
            ]
        );
    }
}
