//! vcdev software IOMMU.
