"""A short real run: LeNet-300-100 at density 0.05 on the packaged MNIST with sparse momentum."""

import torch

import sparsemom_ext as sm


def mnist_tensors(split):
    images, labels = sm.data.load_mnist(split)
    x = (torch.from_numpy(images).float().div_(255.0).sub_(0.1307).div_(0.3081)).view(len(images), -1)
    return x, torch.from_numpy(labels)


def test_lenet300_at_5_percent_density_learns_mnist():
    torch.manual_seed(0)
    x_train, y_train = mnist_tensors("train")
    x_test, y_test = mnist_tensors("test")
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 300), torch.nn.ReLU(),
        torch.nn.Linear(300, 100), torch.nn.ReLU(),
        torch.nn.Linear(100, 10),
    )
    sm.sparsify(model, density=0.05, generator=torch.Generator().manual_seed(0))
    # The paper trains 100 epochs with step LR decay; a short run needs the decay
    # compressed into it (cosine over the run) to settle below 2.5%.
    epochs, batch = 10, 100
    steps_per_epoch = len(x_train) // batch
    optimizer = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    engine = sm.SparseMomentum(model, optimizer, prune_rate=0.5, total_steps=epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
            schedule.step()
            engine.step()
        engine.end_of_epoch()
    with torch.no_grad():
        error = (model(x_test).argmax(1) != y_test).float().mean().item()
    report = sm.density_report(model)
    print(f"\nLeNet-300-100, density 0.05, {epochs} epochs: test error {100 * error:.2f}%\n{report}")
    assert engine.updates == epochs - 1
    assert abs(report.total_density - 0.05) < 1e-3
    assert error < 0.025
